//! A simulator of the MIM CM REST API and the SCEPman Management API, a real HTTP server on
//! loopback.
//!
//! MIM CM is a Windows product that cannot run here, so this stands in for it, following the
//! documented behaviour and quirks rather than an idealised API: case-insensitive routes under
//! `/CertificateManagement/api/v1.0/`, PascalCase JSON, 204 when nothing is found, a single object
//! (not an array) for `smartcards?cardid=`, `SerialNumber` as a braced GUID, lower-case ATRs,
//! `POST requests` answering a bare JSON string URI, RequestStatus numbers of the SQL API; SCEPman
//! search with paging and revoke with its 404/7012 and 409/5013 answers.
//!
//! Faults are set per route: latency, a 500 with a correlation id, a garbage body, a dropped
//! connection. Every request is logged (method, path, query, body, client port) for tests.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context as _, Result};
use axum::body::Bytes;
use axum::extract::{ConnectInfo, Query, State};
use axum::http::{Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Router;
use cardbridge::cm::model::request_status_name;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::sim_auth::{AuthState, AuthStats, SimAuth, Verdict};
use crate::vcard::Truth;

/// The simulator's data.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Fixture {
    #[serde(default)]
    pub smartcards: Vec<SimCard>,
    /// Certificates known to SCEPman (search and revoke).
    #[serde(default)]
    pub scepman: Vec<ScepmanCert>,
    /// A created CM request completes after this many looks at it (`GET requests/{id}`), as if
    /// approved and executed; 0 leaves requests pending until a test decides.
    #[serde(default)]
    pub complete_requests_after: u32,
}

/// A smart card record with what hangs off it.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SimCard {
    /// The Smartcard object as the server sends it (PascalCase fields).
    pub smartcard: Value,
    #[serde(default)]
    pub certificates: Vec<Value>,
    #[serde(default)]
    pub operations: Vec<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ScepmanCert {
    pub serial_number: String,
    pub subject: String,
    #[serde(default)]
    pub revocation_date: Option<String>,
    #[serde(default)]
    pub revocation_reason: Option<i64>,
    #[serde(default)]
    pub revoked_by: Option<String>,
}

/// The MIM CM `Uuid` that [`matching_record`] gives a card: the card id's bytes reversed, so it
/// differs from the card id (as a CM record's Uuid does) and each card of a fixture has its own.
pub fn smartcard_uuid(truth: &Truth) -> String {
    let mut id = card_id_bytes(truth);
    id.reverse();
    cardbridge::card::guid_string(&id)
}

fn card_id_bytes(truth: &Truth) -> [u8; 16] {
    let mut id = [0u8; 16];
    if let Some(bytes) = truth.card_id.as_deref().and_then(|h| hex::decode(h).ok()) {
        if bytes.len() == 16 {
            id.copy_from_slice(&bytes);
        }
    }
    id
}

/// The card's id as the GUID string of its serial number: RFC 4122 order, or Windows order (the
/// first three fields byte-swapped), as a MIM CM deployment may record it.
pub fn card_guid(truth: &Truth, windows: bool) -> String {
    let mut id = card_id_bytes(truth);
    if windows {
        id[0..4].reverse();
        id[4..6].reverse();
        id[6..8].reverse();
    }
    cardbridge::card::guid_string(&id)
}

/// The same records with every serial number written without its DER sign byte (`D5D4…` for
/// `00D5D4…`), as some SCEPman installations list them.
pub fn without_sign_bytes(certs: Vec<ScepmanCert>) -> Vec<ScepmanCert> {
    certs
        .into_iter()
        .map(|c| ScepmanCert {
            serial_number: c
                .serial_number
                .strip_prefix("00")
                .unwrap_or(&c.serial_number)
                .to_string(),
            ..c
        })
        .collect()
}

/// SCEPman's records of a virtual card's certificates (serial numbers as SCEPman writes them:
/// upper-case hex, in the certificate's DER form), none revoked.
pub fn scepman_certs(truth: &Truth) -> Vec<ScepmanCert> {
    truth
        .certificates
        .iter()
        .filter_map(|c| {
            let der = hex::decode(&c.der).ok()?;
            let info = cardbridge::card::cert::CertificateInfo::from_der(
                c.slot.clone(),
                String::new(),
                der,
                false,
            );
            Some(ScepmanCert {
                serial_number: info.serial_number?,
                subject: info.subject.unwrap_or_default(),
                ..ScepmanCert::default()
            })
        })
        .collect()
}

/// A server record that matches a virtual card exactly: Active, the same ATR (lower case, as CM
/// stores it), every certificate of the card, the usual operations.
pub fn matching_record(truth: &Truth, windows: bool) -> SimCard {
    SimCard {
        smartcard: json!({
            "Uuid": smartcard_uuid(truth), "Status": 2, "Flags": 1,
            "AssignedUserUuid": "8f1590dc-d932-4b66-8e68-2e91c5880780",
            "ProfileTemplateUuid": "a039b4d0-5ce8-4eff-8651-181c6576fda3", "ProfileTemplateVersion": 46,
            "Comment": "", "SerialNumber": format!("{{{}}}", card_guid(truth, windows)),
            "Middleware": "MSBaseCSP", "Atr": truth.atr.to_lowercase(),
        }),
        certificates: truth
            .certificates
            .iter()
            .map(|c| {
                json!({"IsKeyHistory": false, "ArchivedOnCa": false, "CertificateType": 1,
                       "TemplateCommonName": "ContosoSmartcardUser", "SerialNumber": "1B00",
                       "Thumbprint": c.thumbprint})
            })
            .collect(),
        operations: vec!["renew".into(), "retire".into(), "revoke".into()],
    }
}

/// A fault injected on one route (`smartcards`, `certificates`, `operations`, `requests`,
/// `search`, `revoke`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fault {
    #[serde(default)]
    pub latency_ms: u64,
    /// Answer 500 with a correlation id in the message.
    #[serde(default)]
    pub error_500: bool,
    /// Answer 200 with a body that is not JSON.
    #[serde(default)]
    pub garbage: bool,
    /// Close the connection without answering.
    #[serde(default)]
    pub drop: bool,
    /// Carry the request out, then wait this long before answering (a slow answer to a request
    /// that has already taken effect).
    #[serde(default)]
    pub answer_delay_ms: u64,
    /// Answer 409 with this SCEPman `errorCode` (5013 is "already revoked"; others are not).
    #[serde(default)]
    pub conflict_code: Option<i64>,
    /// Answer 200 with a JSON body this many bytes long (an answer no client should read whole).
    #[serde(default)]
    pub huge_body: usize,
}

/// One request as the simulator received it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Logged {
    pub method: String,
    pub path: String,
    pub query: Option<String>,
    pub body: String,
    pub client: SocketAddr,
    pub route: String,
    /// The Authorization header, for tests of the client's authentication.
    pub authorization: Option<String>,
}

#[derive(Default)]
struct Inner {
    fixture: Fixture,
    index: Index,
    requests: Vec<Value>,
    faults: HashMap<String, Fault>,
    /// The newest [`MAX_LOGGED`] requests.
    log: std::collections::VecDeque<Logged>,
    /// Serial numbers of the revocations carried out, in order (a refused or faulted PATCH is
    /// not one).
    carried_out: Vec<String>,
    auth: AuthState,
}

type Shared = Arc<Mutex<Inner>>;

/// Requests the log keeps: every test's whole conversation, and a bound for the simulated year's
/// millions.
const MAX_LOGGED: usize = 100_000;

/// Where each card record is in the fixture, by normalised `SerialNumber` and `Uuid` (the first
/// record of each, as a scan would find), so that a lookup among the simulated year's tens of
/// thousands of records is not a scan.
#[derive(Default)]
struct Index {
    by_serial: HashMap<String, usize>,
    by_uuid: HashMap<String, usize>,
}

impl Index {
    fn of(fixture: &Fixture) -> Index {
        let mut index = Index::default();
        for (i, card) in fixture.smartcards.iter().enumerate() {
            if let Some(serial) = field(&card.smartcard, "SerialNumber") {
                index.by_serial.entry(norm_guid(serial)).or_insert(i);
            }
            if let Some(uuid) = field(&card.smartcard, "Uuid") {
                index.by_uuid.entry(norm_guid(uuid)).or_insert(i);
            }
        }
        index
    }
}

/// A running simulator; dropping it stops the server.
pub struct Simulator {
    pub addr: SocketAddr,
    scheme: &'static str,
    inner: Shared,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Simulator {
    /// Starts on `127.0.0.1:port` (0 = any free port) on a thread of its own, over plain HTTP.
    pub fn start(fixture: Fixture, port: u16) -> Result<Simulator> {
        Simulator::start_with(fixture, port, None)
    }

    /// Starts over HTTPS with the given certificate chain and PKCS#8 key (DER). With
    /// `client_ca`, clients must present a certificate issued by that CA (mutual TLS).
    pub fn start_tls(
        fixture: Fixture,
        port: u16,
        chain: Vec<Vec<u8>>,
        key: Vec<u8>,
        client_ca: Option<Vec<u8>>,
    ) -> Result<Simulator> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()?;
        let builder = match client_ca {
            None => builder.with_no_client_auth(),
            Some(ca) => {
                let mut roots = rustls::RootCertStore::empty();
                roots.add(ca.into())?;
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                    Arc::new(roots),
                    provider,
                )
                .build()?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        let config = builder.with_single_cert(
            chain.into_iter().map(Into::into).collect(),
            rustls::pki_types::PrivateKeyDer::Pkcs8(key.into()),
        )?;
        Simulator::start_with(fixture, port, Some(Arc::new(config)))
    }

    fn start_with(
        fixture: Fixture,
        port: u16,
        tls: Option<Arc<rustls::ServerConfig>>,
    ) -> Result<Simulator> {
        let inner: Shared = Arc::new(Mutex::new(Inner {
            index: Index::of(&fixture),
            fixture,
            ..Inner::default()
        }));
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()?;
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind(("127.0.0.1", port)))
            .with_context(|| format!("cannot listen on 127.0.0.1:{port}"))?;
        let addr = listener.local_addr()?;
        let scheme = if tls.is_some() { "https" } else { "http" };
        let app = Router::new()
            .fallback(dispatch)
            .with_state(inner.clone())
            .into_make_service_with_connect_info::<Peer>();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let stop = async {
            let _ = rx.await;
        };
        let thread = std::thread::Builder::new()
            .name("cm-sim".into())
            .spawn(move || {
                runtime.block_on(async move {
                    let served = match tls {
                        None => {
                            let listener = PlainListener { tcp: listener };
                            axum::serve(listener, app)
                                .with_graceful_shutdown(stop)
                                .await
                        }
                        Some(config) => {
                            let listener = TlsListener {
                                tcp: listener,
                                acceptor: tokio_rustls::TlsAcceptor::from(config),
                            };
                            axum::serve(listener, app)
                                .with_graceful_shutdown(stop)
                                .await
                        }
                    };
                    if let Err(e) = served {
                        eprintln!("cm-sim: {e}");
                    }
                });
            })?;
        Ok(Simulator {
            addr,
            scheme,
            inner,
            shutdown: Some(tx),
            thread: Some(thread),
        })
    }

    /// The MIM CM base URL to configure in cardbridge.
    pub fn cm_base_url(&self) -> String {
        format!("{}://{}/CertificateManagement/", self.scheme, self.addr)
    }

    pub fn set_fault(&self, route: &str, fault: Fault) {
        lock(&self.inner).faults.insert(route.to_string(), fault);
    }

    /// Swaps the server's data, as if an administrator changed the records.
    pub fn replace_fixture(&self, fixture: Fixture) {
        let mut inner = lock(&self.inner);
        inner.index = Index::of(&fixture);
        inner.fixture = fixture;
    }

    /// The SCEPman Management API base URL to configure in cardbridge.
    pub fn scepman_base_url(&self) -> String {
        format!("{}://{}/", self.scheme, self.addr)
    }

    /// The CM requests created so far (their JSON as `GET requests/{id}` shows them).
    pub fn requests(&self) -> Vec<Value> {
        lock(&self.inner).requests.clone()
    }

    /// Moves a CM request to another RequestStatus (8 Completed, 9 Failed, 4 Denied…), as the
    /// server's workflow would.
    pub fn set_request_status(&self, uuid: &str, status: i64) {
        for r in lock(&self.inner).requests.iter_mut() {
            if field(r, "Uuid") == Some(&norm_guid(uuid)) {
                r["Status"] = json!(status);
            }
        }
    }

    /// SCEPman's view of its certificates now (revocation date, reason, revoker).
    pub fn scepman(&self) -> Vec<ScepmanCert> {
        lock(&self.inner).fixture.scepman.clone()
    }

    pub fn log(&self) -> Vec<Logged> {
        lock(&self.inner).log.iter().cloned().collect()
    }

    pub fn clear_log(&self) {
        lock(&self.inner).log.clear();
    }

    /// Makes every route demand this authentication (Negotiate needs `KRB5_KTNAME` set to the
    /// service keytab in this process's environment).
    pub fn set_auth(&self, auth: SimAuth) -> Result<()> {
        lock(&self.inner).auth.set(auth)
    }

    /// What the authentication side has seen: Kerberos exchanges, tokens, refusals.
    pub fn auth_stats(&self) -> AuthStats {
        lock(&self.inner).auth.stats.clone()
    }

    /// The serial numbers of the revocations carried out so far, in order.
    pub fn revocations_carried_out(&self) -> Vec<String> {
        lock(&self.inner).carried_out.clone()
    }

    /// Refuses every access token issued so far, as after a signing-key rollover.
    pub fn revoke_tokens(&self) {
        lock(&self.inner).auth.revoke_tokens();
    }

    /// The Entra ID v2 token endpoint of a tenant.
    pub fn entra_token_url(&self) -> String {
        format!(
            "{}://{}/0f3c7a3e-tenant/oauth2/v2.0/token",
            self.scheme, self.addr
        )
    }

    /// The AD FS token endpoint.
    pub fn adfs_token_url(&self) -> String {
        format!("{}://{}/adfs/oauth2/token", self.scheme, self.addr)
    }
}

impl Drop for Simulator {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The client's address, for plain and TLS connections alike.
#[derive(Debug, Clone, Copy)]
struct Peer(SocketAddr);

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, PlainListener>>
    for Peer
{
    fn connect_info(stream: axum::serve::IncomingStream<'_, PlainListener>) -> Self {
        *stream.remote_addr()
    }
}

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, TlsListener>> for Peer {
    fn connect_info(stream: axum::serve::IncomingStream<'_, TlsListener>) -> Self {
        *stream.remote_addr()
    }
}

/// Accepts TCP connections with TCP_NODELAY set, like IIS: with Nagle, the body written after
/// the headers would wait for the client's delayed ACK.
struct PlainListener {
    tcp: tokio::net::TcpListener,
}

impl axum::serve::Listener for PlainListener {
    type Io = tokio::net::TcpStream;
    type Addr = Peer;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            if let Ok((tcp, addr)) = self.tcp.accept().await {
                let _ = tcp.set_nodelay(true);
                return (tcp, Peer(addr));
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.tcp.local_addr().map(Peer)
    }
}

/// Accepts TCP connections and completes the TLS handshake; failed handshakes (a client that
/// does not trust the certificate) are dropped and the next connection is accepted.
struct TlsListener {
    tcp: tokio::net::TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
}

impl axum::serve::Listener for TlsListener {
    type Io = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;
    type Addr = Peer;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let Ok((tcp, addr)) = self.tcp.accept().await else {
                continue;
            };
            let _ = tcp.set_nodelay(true);
            if let Ok(tls) = self.acceptor.accept(tcp).await {
                return (tls, Peer(addr));
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.tcp.local_addr().map(Peer)
    }
}

fn lock(m: &Mutex<Inner>) -> std::sync::MutexGuard<'_, Inner> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The simulator's lock seen as its authentication state: all `sim_auth` may touch.
struct AuthGuard<'a>(std::sync::MutexGuard<'a, Inner>);

impl std::ops::Deref for AuthGuard<'_> {
    type Target = AuthState;
    fn deref(&self) -> &AuthState {
        &self.0.auth
    }
}

impl std::ops::DerefMut for AuthGuard<'_> {
    fn deref_mut(&mut self) -> &mut AuthState {
        &mut self.0.auth
    }
}

fn norm_guid(text: &str) -> String {
    text.trim()
        .trim_matches(|c| c == '{' || c == '}')
        .to_ascii_lowercase()
}

fn field<'a>(v: &'a Value, name: &str) -> Option<&'a str> {
    v.get(name).and_then(Value::as_str)
}

/// The route name used for faults and the log, from the lower-cased path segments.
fn route_of(segments: &[&str]) -> &'static str {
    match segments {
        ["certificatemanagement", "api", "v1.0", "smartcards", ..] => match segments.get(5) {
            Some(&"certificates") => "certificates",
            Some(&"operations") => "operations",
            _ => "smartcards",
        },
        ["certificatemanagement", "api", "v1.0", "requests", ..] => "requests",
        ["api", "manage", "search"] => "search",
        ["api", "manage", "revoke", _] => "revoke",
        [_, "oauth2", "v2.0", "token"] | ["adfs", "oauth2", "token"] => "token",
        _ => "unknown",
    }
}

async fn dispatch(
    State(inner): State<Shared>,
    ConnectInfo(Peer(client)): ConnectInfo<Peer>,
    method: Method,
    uri: Uri,
    headers: axum::http::HeaderMap,
    Query(params): Query<Vec<(String, String)>>,
    body: Bytes,
) -> Response {
    let path = uri.path().to_ascii_lowercase();
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let route = route_of(&segments);
    let fault = {
        let mut state = lock(&inner);
        if state.log.len() >= MAX_LOGGED {
            state.log.pop_front();
        }
        state.log.push_back(Logged {
            method: method.to_string(),
            path: uri.path().to_string(),
            query: uri.query().map(str::to_string),
            body: String::from_utf8_lossy(&body).into_owned(),
            client,
            route: route.to_string(),
            authorization: headers
                .get(axum::http::header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string),
        });
        state.faults.get(route).cloned().unwrap_or_default()
    };
    if route == "token" && method == Method::POST {
        let host = headers
            .get(axum::http::header::HOST)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        let url = format!(
            "{}://{host}{}",
            if uri.scheme_str() == Some("https") {
                "https"
            } else {
                "http"
            },
            uri.path()
        );
        let entra = segments.get(2) == Some(&"v2.0");
        return crate::sim_auth::token_endpoint(&mut lock(&inner).auth, &url, entra, &body);
    }
    let added = match crate::sim_auth::check(|| AuthGuard(lock(&inner)), client, &headers) {
        Verdict::Pass(added) => added,
        Verdict::Refuse(response) => return response,
    };
    if fault.latency_ms > 0 {
        tokio::time::sleep(Duration::from_millis(fault.latency_ms)).await;
    }
    if fault.drop {
        // Unwinding out of the connection's task makes hyper close it without an answer;
        // resume_unwind skips the panic hook, so nothing is printed.
        std::panic::resume_unwind(Box::new("cm-sim: dropping the connection"));
    }
    if fault.error_500 {
        let id = "6f9619ff-8b86-d011-b42d-00c04fc964ff";
        return (
            StatusCode::INTERNAL_SERVER_ERROR,
            axum::Json(json!({"Message": format!("An error has occurred. Please contact your administrator. Correlation ID: {id}")})),
        )
            .into_response();
    }
    if let Some(code) = fault.conflict_code {
        return (
            StatusCode::CONFLICT,
            axum::Json(json!({"errorMessage": "The operation conflicts with the certificate's state.", "errorCode": code})),
        )
            .into_response();
    }
    if fault.huge_body > 0 {
        let body = format!("[\"{}\"]", "x".repeat(fault.huge_body.saturating_sub(4)));
        return (StatusCode::OK, [("content-type", "application/json")], body).into_response();
    }
    if fault.garbage {
        return (
            StatusCode::OK,
            [("content-type", "application/json")],
            "<html>Service Unavailable</html>",
        )
            .into_response();
    }
    // ASP.NET binds query parameters case-insensitively.
    let query: HashMap<String, String> = params
        .into_iter()
        .map(|(k, v)| (k.to_ascii_lowercase(), v))
        .collect();
    let mut answer = handle(&mut lock(&inner), &method, &segments, &query, &body);
    for (name, value) in added {
        answer.headers_mut().append(name, value);
    }
    if fault.answer_delay_ms > 0 {
        tokio::time::sleep(Duration::from_millis(fault.answer_delay_ms)).await;
    }
    answer
}

fn handle(
    state: &mut Inner,
    method: &Method,
    segments: &[&str],
    query: &HashMap<String, String>,
    body: &[u8],
) -> Response {
    let no_content = || StatusCode::NO_CONTENT.into_response();
    let ok = |v: Value| (StatusCode::OK, axum::Json(v)).into_response();
    let find_uuid = |state: &Inner, uuid: &str| {
        let i = state.index.by_uuid.get(&norm_guid(uuid))?;
        state.fixture.smartcards.get(*i).cloned()
    };
    match (method.as_str(), segments) {
        ("GET", ["certificatemanagement", "api", "v1.0", "smartcards"]) => {
            let Some(card_id) = query.get("cardid") else {
                return ok(Value::Array(
                    state
                        .fixture
                        .smartcards
                        .iter()
                        .map(|c| c.smartcard.clone())
                        .collect(),
                ));
            };
            let found = state.index.by_serial.get(&norm_guid(card_id));
            match found.and_then(|i| state.fixture.smartcards.get(*i)) {
                // A single object, as the documentation's example shows.
                Some(card) => ok(card.smartcard.clone()),
                None => no_content(),
            }
        }
        ("GET", ["certificatemanagement", "api", "v1.0", "smartcards", uuid]) => {
            match find_uuid(state, uuid) {
                Some(card) => ok(card.smartcard),
                None => no_content(),
            }
        }
        ("GET", ["certificatemanagement", "api", "v1.0", "smartcards", uuid, "certificates"]) => {
            match find_uuid(state, uuid) {
                Some(card) if !card.certificates.is_empty() => ok(Value::Array(card.certificates)),
                _ => no_content(),
            }
        }
        ("GET", ["certificatemanagement", "api", "v1.0", "smartcards", uuid, "operations"]) => {
            match find_uuid(state, uuid) {
                Some(card) => ok(json!(card.operations)),
                None => no_content(),
            }
        }
        ("GET", ["certificatemanagement", "api", "v1.0", "requests"]) => {
            let wanted = query.get("status").map(|s| s.to_ascii_lowercase());
            let list: Vec<Value> = state
                .requests
                .iter()
                .filter(|r| {
                    wanted.as_deref().is_none_or(|w| {
                        request_status_name(r["Status"].as_i64().unwrap_or(0)).to_ascii_lowercase()
                            == w
                    })
                })
                .cloned()
                .collect();
            if list.is_empty() {
                no_content()
            } else {
                ok(Value::Array(list))
            }
        }
        ("GET", ["certificatemanagement", "api", "v1.0", "requests", id]) => {
            let complete_after = state.fixture.complete_requests_after;
            let Some(r) = state
                .requests
                .iter_mut()
                .find(|r| field(r, "Uuid") == Some(&norm_guid(id)))
            else {
                return no_content();
            };
            let looks = r["Looks"].as_u64().unwrap_or(0) + 1;
            r["Looks"] = json!(looks);
            if complete_after > 0 && looks >= u64::from(complete_after) && r["Status"] == 16 {
                r["Status"] = json!(8);
                r["Completed"] = json!("2026-11-22T12:05:00");
            }
            let mut answer = r.clone();
            if let Some(o) = answer.as_object_mut() {
                o.remove("Looks");
            }
            ok(answer)
        }
        ("POST", ["certificatemanagement", "api", "v1.0", "requests"]) => {
            let Ok(request) = serde_json::from_slice::<Value>(body) else {
                return StatusCode::BAD_REQUEST.into_response();
            };
            let uuid = format!(
                "{:08x}-0000-4000-8000-{:012x}",
                state.requests.len() + 1,
                fastrand::u64(..1 << 48)
            );
            let request_type = match request
                .get("type")
                .and_then(Value::as_str)
                .map(str::to_ascii_lowercase)
                .as_deref()
            {
                Some("enroll") => 1,
                Some("unblock") => 5,
                Some("retire") => 9,
                Some("revoke") => 3,
                _ => 0,
            };
            state.requests.push(json!({
                "Uuid": uuid,
                "RequestType": request_type,
                "Status": 16,
                "Comment": request.get("comment").cloned().unwrap_or(Value::Null),
                "OldSmartcardUuid": request.get("smartcard").cloned().unwrap_or(Value::Null),
                "NewSmartcardUuid": request.get("smartcard").cloned().unwrap_or(Value::Null),
                "Submitted": "2026-11-22T12:00:00",
                "Completed": "0001-01-01T00:00:00",
            }));
            (
                StatusCode::CREATED,
                axum::Json(json!(format!("api/v1.0/requests/{uuid}"))),
            )
                .into_response()
        }
        ("GET", ["api", "manage", "search"]) => {
            let page_size: usize = query
                .get("pagesize")
                .and_then(|p| p.parse().ok())
                .unwrap_or(50)
                .clamp(1, 500);
            // SCEPman's own client sends only the token for the next page, so the token carries
            // the query (opaque to clients, like SCEPman's).
            let search = match query.get("continuationtoken") {
                Some(token) => match Search::from_token(token) {
                    Some(search) => search,
                    None => return StatusCode::BAD_REQUEST.into_response(),
                },
                None => Search::from_query(query),
            };
            let hits: Vec<&ScepmanCert> = state
                .fixture
                .scepman
                .iter()
                .filter(|c| search.matches(c))
                .collect();
            let page: Vec<Value> = hits
                .iter()
                .skip(search.start)
                .take(page_size)
                .map(|c| scepman_item(c))
                .collect();
            let next = (search.start + page_size < hits.len()).then(|| {
                Search {
                    start: search.start + page_size,
                    ..search.clone()
                }
                .token()
            });
            ok(json!({"items": page, "continuationToken": next}))
        }
        ("PATCH", ["api", "manage", "revoke", serial]) => {
            let request = serde_json::from_slice::<Value>(body).ok();
            let reason = request
                .as_ref()
                .and_then(|b| b.get("revocationReason").and_then(Value::as_i64));
            let revoker = request
                .as_ref()
                .and_then(|b| b.get("revoker").and_then(Value::as_str))
                .map(|r| format!("{r} through API user cardbridge-sim"));
            // SCEPman's own serials and the path's are compared as integers: a sign byte, or
            // its absence, on either side changes nothing.
            let wanted = cardbridge::serial::Serial::parse(serial).ok();
            let listed =
                |c: &ScepmanCert| wanted.as_ref().is_some_and(|w| w.matches(&c.serial_number));
            match state.fixture.scepman.iter_mut().find(|c| listed(c)) {
                None => (StatusCode::NOT_FOUND, axum::Json(json!({"errorMessage": "Certificate not found.", "errorCode": 7012}))).into_response(),
                Some(c) if c.revocation_date.is_some() => {
                    (StatusCode::CONFLICT, axum::Json(json!({"errorMessage": "The certificate is already revoked.", "errorCode": 5013}))).into_response()
                }
                Some(c) => {
                    state.carried_out.push(c.serial_number.clone());
                    c.revocation_date = Some("2026-11-22T12:00:00Z".into());
                    c.revocation_reason = reason;
                    c.revoked_by = revoker;
                    StatusCode::OK.into_response()
                }
            }
        }
        // With the API disabled or on an unknown route, IIS answers 404.
        _ => StatusCode::NOT_FOUND.into_response(),
    }
}

/// A search in progress: the query and where the next page starts.
#[derive(Clone)]
struct Search {
    text: String,
    validity: String,
    start: usize,
}

impl Search {
    fn from_query(query: &std::collections::HashMap<String, String>) -> Search {
        Search {
            text: query
                .get("searchtext")
                .cloned()
                .unwrap_or_default()
                .to_ascii_lowercase(),
            validity: query
                .get("certvalidity")
                .cloned()
                .unwrap_or_else(|| "any".into())
                .to_ascii_lowercase(),
            start: 0,
        }
    }

    fn token(&self) -> String {
        format!(
            "{}!{}!{}",
            self.start,
            self.validity,
            hex::encode(&self.text)
        )
    }

    fn from_token(token: &str) -> Option<Search> {
        let mut parts = token.splitn(3, '!');
        let start = parts.next()?.parse().ok()?;
        let validity = parts.next()?.to_string();
        let text = String::from_utf8(hex::decode(parts.next()?).ok()?).ok()?;
        Some(Search {
            text,
            validity,
            start,
        })
    }

    /// Substring match on serial and subject, as SCEPman's search does, then `certValidity`.
    fn matches(&self, c: &ScepmanCert) -> bool {
        let text_ok = self.text.is_empty()
            || c.serial_number.to_ascii_lowercase().contains(&self.text)
            || c.subject.to_ascii_lowercase().contains(&self.text);
        let validity_ok = match self.validity.as_str() {
            "revoked" => c.revocation_date.is_some(),
            "active" => c.revocation_date.is_none(),
            "expired" => false,
            _ => true,
        };
        text_ok && validity_ok
    }
}

fn scepman_item(c: &ScepmanCert) -> Value {
    json!({
        "serialNumber": c.serial_number, "subject": c.subject, "sans": null, "upn": null,
        "issuanceDate": "2026-01-01T00:00:00Z", "expirationDate": "2028-01-01T00:00:00Z",
        "revocationDate": c.revocation_date, "revocationReason": c.revocation_reason,
        "revokedBy": c.revoked_by, "requester": "pkiAdmin@contoso.com",
        "source": "CertificateMaster", "certificateType": "Static",
    })
}
