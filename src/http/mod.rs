//! What the MIM CM and SCEPman clients share: one `reqwest` client per server (rustls with the
//! system trust store plus an optional CA bundle, optional client certificate, HTTP/1.1
//! keep-alive, a bounded cookie jar ([`cookies`]), connect and total timeouts, answers bounded
//! to 1 MiB), the authentication exchange (bearer, basic, Negotiate, OAuth; see
//! [`crate::auth`]), error classes an administrator can act on, and the backoff used for
//! retries.

pub mod cookies;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use regex::Regex;
use reqwest::header::{AUTHORIZATION, WWW_AUTHENTICATE};
use reqwest::{Client, ClientBuilder, RequestBuilder, Response, StatusCode, Url};
use thiserror::Error;

use crate::auth::negotiate::{self, Handshake, Negotiator, Proof};
use crate::auth::oauth::{Audience, ClientCredential, TokenSource};
use crate::auth::secret::{SecretError, SecretPath};
use crate::auth::AuthError;
use crate::config::{ServerAuth, ServerConfig};

/// Why a call to a server failed. [`ServerError::code`] is stable (reasons, audit rows).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ServerError {
    #[error("invalid server configuration: {0}")]
    Config(String),
    #[error("cannot resolve the server's name: {0}")]
    Dns(String),
    #[error("the server refused the connection: {0}")]
    Refused(String),
    #[error("TLS with the server failed: {0}")]
    Tls(String),
    #[error("cannot connect to the server: {0}")]
    Connect(String),
    #[error("the server did not answer in time")]
    Timeout,
    #[error("the server answered {status}{}{}: {message}", error_code.map(|c| format!(" (error code {c})")).unwrap_or_default(), correlation_id.as_ref().map(|c| format!(" (correlation id {c})")).unwrap_or_default())]
    Status {
        status: u16,
        /// SCEPman's `errorCode` (7012 not found, 5013 already revoked, 4711 edition).
        error_code: Option<i64>,
        /// The id MIM CM puts in the message of a 500, to find its event-log entry.
        correlation_id: Option<String>,
        message: String,
    },
    #[error("the server answered {status} with a body that is not the expected JSON: {detail}")]
    BadBody { status: u16, detail: String },
    #[error("authentication failed: {0}")]
    Auth(#[from] AuthError),
}

impl ServerError {
    pub fn code(&self) -> &'static str {
        match self {
            ServerError::Config(_) => "config",
            ServerError::Dns(_) => "dns",
            ServerError::Refused(_) => "connection_refused",
            ServerError::Tls(_) => "tls",
            ServerError::Connect(_) => "connect",
            ServerError::Timeout => "timeout",
            ServerError::Status { .. } => "http_status",
            ServerError::BadBody { .. } => "bad_body",
            ServerError::Auth(_) => "auth_failed",
        }
    }

    /// Worth another try later: the network, the server's health, or authentication (an
    /// administrator may fix the keytab or the secret), not the request itself.
    pub fn is_transient(&self) -> bool {
        match self {
            ServerError::Refused(_)
            | ServerError::Connect(_)
            | ServerError::Timeout
            | ServerError::Dns(_)
            | ServerError::Auth(_) => true,
            ServerError::Status { status, .. } => *status >= 500,
            ServerError::BadBody { .. } | ServerError::Tls(_) | ServerError::Config(_) => false,
        }
    }

    /// SCEPman's `errorCode` of a [`ServerError::Status`].
    pub fn error_code(&self) -> Option<i64> {
        match self {
            ServerError::Status { error_code, .. } => *error_code,
            _ => None,
        }
    }

    /// The HTTP status of a [`ServerError::Status`].
    pub fn status(&self) -> Option<u16> {
        match self {
            ServerError::Status { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// The most a MIM CM or SCEPman answer may hold; the largest real one (a card's certificate
/// list) is a few KiB.
pub const MAX_BODY: usize = 1 << 20;

/// Negotiate legs before giving up (Kerberos needs one; SPNEGO may add one).
const MAX_LEGS: usize = 3;

/// One configured server: the HTTP client, the base URL and how to authenticate.
#[derive(Clone)]
pub struct Server {
    pub http: Client,
    /// API paths are joined to it; it always ends with `/`.
    base: Url,
    auth: Auth,
    /// Extra attempts for idempotent requests after a transient failure.
    pub retries: u32,
    /// `cm` or `scepman`, for messages.
    section: &'static str,
    /// The cause of the authentication failure last logged, so that a failing keytab or
    /// secret is logged once as an error, not at every card.
    alarm: Arc<Mutex<Option<&'static str>>>,
    proof: Arc<Mutex<Option<Proof>>>,
}

#[derive(Clone)]
enum Auth {
    None,
    Bearer(String),
    Basic(String, String),
    Negotiate(Arc<Negotiator>),
    Oauth(Arc<TokenSource>),
}

impl Server {
    /// Builds the client for the `[section]` of the configuration (`cm`, `scepman`); errors name
    /// the section's key.
    pub fn new(config: &ServerConfig, section: &'static str) -> Result<Server, ServerError> {
        let bad =
            |key: &str, detail: String| ServerError::Config(format!("{section}.{key}: {detail}"));
        let mut base = Url::parse(&config.base_url).map_err(|e| bad("base_url", e.to_string()))?;
        if !base.path().ends_with('/') {
            base.set_path(&format!("{}/", base.path()));
        }
        let http = client_builder(config, section)?
            .cookie_provider(Arc::new(cookies::CookieJar::default()))
            .http1_only()
            .build()
            .map_err(|e| ServerError::Config(e.to_string()))?;
        let auth = auth_of(config, section, &base)?;
        Ok(Server {
            http,
            base,
            auth,
            retries: config.retries,
            section,
            alarm: Arc::new(Mutex::new(None)),
            proof: Arc::new(Mutex::new(None)),
        })
    }

    pub fn url(&self, path: &str) -> Result<Url, ServerError> {
        self.base
            .join(path)
            .map_err(|e| ServerError::Config(format!("cannot build the URL for {path}: {e}")))
    }

    /// Sends a request that is never retried (a POST or PATCH that changes something), with
    /// this server's authentication; a non-success answer becomes a [`ServerError::Status`].
    /// Returns the status and the body.
    pub async fn send_once(
        &self,
        request: RequestBuilder,
    ) -> Result<(StatusCode, String), ServerError> {
        let response = self.execute(request).await?;
        let status = response.status();
        let body = read_body(response).await?;
        let text = String::from_utf8_lossy(&body).into_owned();
        if !status.is_success() {
            return Err(status_error(status, &text));
        }
        Ok((status, text))
    }

    /// Sends a request with this server's authentication, answering a Negotiate challenge or
    /// replacing a refused OAuth token on the way. The body must be one `reqwest` can send
    /// twice (JSON and forms are).
    pub async fn execute(&self, request: RequestBuilder) -> Result<Response, ServerError> {
        let result = match &self.auth {
            Auth::None => request.send().await.map_err(classify),
            Auth::Bearer(token) => request.bearer_auth(token).send().await.map_err(classify),
            Auth::Basic(user, password) => request
                .basic_auth(user, Some(password))
                .send()
                .await
                .map_err(classify),
            Auth::Negotiate(negotiator) => self.negotiate(negotiator, request).await,
            Auth::Oauth(tokens) => oauth(tokens, request).await,
        };
        self.note_authentication(&result);
        result
    }

    /// The OAuth token source, when this server uses one (`check-config --online`, tests).
    pub fn token_source(&self) -> Option<&TokenSource> {
        match &self.auth {
            Auth::Oauth(tokens) => Some(tokens),
            _ => None,
        }
    }

    /// What the last Negotiate handshake proved (principal, SPN, ticket lifetime), for
    /// `check-config --online`.
    pub fn kerberos_proof(&self) -> Option<Proof> {
        self.proof.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// HTTP Negotiate: the request goes out without a token first, so that a connection the
    /// server has already authenticated (IIS keeps Kerberos per connection by default) costs no
    /// handshake; a `401 Negotiate` then gets a ticket, and the answer must prove the server's
    /// identity (mutual authentication) before it is believed.
    async fn negotiate(
        &self,
        n: &Arc<Negotiator>,
        request: RequestBuilder,
    ) -> Result<Response, ServerError> {
        let first = replay(&request)?.send().await.map_err(classify)?;
        if !challenged(&first, n)? {
            return Ok(first);
        }
        let _ = read_body(first).await;
        let starter = n.clone();
        let (mut handshake, mut token) = blocking(move || starter.start()).await?;
        for _ in 0..MAX_LEGS {
            let response = replay(&request)?
                .header(AUTHORIZATION, negotiate::authorization(&token))
                .send()
                .await
                .map_err(classify)?;
            let server_token = offers(&response).negotiate.flatten();
            if response.status() == StatusCode::UNAUTHORIZED {
                // Another leg, or a refusal whose token (a KRB-ERROR) says why.
                let server_token = server_token
                    .ok_or_else(|| refused(n, "the server answered 401 to the ticket".into()))?;
                let next;
                (handshake, next) =
                    step(n, handshake, server_token)
                        .await
                        .map_err(|e| match e {
                            AuthError::MutualAuth { detail, .. } => refused(n, detail),
                            e => e.into(),
                        })?;
                token = next.ok_or_else(|| {
                    refused(n, "the server answered 401 to a completed handshake".into())
                })?;
                continue;
            }
            if let Some(server_token) = server_token {
                (handshake, _) = step(n, handshake, server_token).await?;
            }
            if response.status().is_success() {
                let proof = n.verify(&handshake)?;
                *self.proof.lock().unwrap_or_else(|p| p.into_inner()) = Some(proof);
            }
            return Ok(response);
        }
        Err(refused(n, format!("no answer after {MAX_LEGS} legs")))
    }

    /// Logs the first authentication failure of a kind as an error naming the fix, and the
    /// return to normal once.
    fn note_authentication(&self, result: &Result<Response, ServerError>) {
        let mut alarm = self.alarm.lock().unwrap_or_else(|p| p.into_inner());
        match result {
            Err(ServerError::Auth(e)) if *alarm != Some(e.cause()) => {
                tracing::error!(
                    server = self.section,
                    "authentication failed: {e}. To fix: {}",
                    e.fix()
                );
                *alarm = Some(e.cause());
            }
            Ok(response) if alarm.is_some() && response.status() != StatusCode::UNAUTHORIZED => {
                tracing::info!(server = self.section, "authentication works again");
                *alarm = None;
            }
            _ => {}
        }
    }
}

/// A `reqwest` client builder with the section's TLS trust, client certificate and timeouts.
fn client_builder(config: &ServerConfig, section: &str) -> Result<ClientBuilder, ServerError> {
    let bad = |key: &str, detail: String| ServerError::Config(format!("{section}.{key}: {detail}"));
    let mut builder = Client::builder()
        .use_rustls_tls()
        .connect_timeout(config.connect_timeout())
        .timeout(config.timeout())
        .pool_idle_timeout(Duration::from_secs(90))
        .user_agent(concat!("cardbridge/", env!("CARGO_PKG_VERSION")));
    if let Some(path) = &config.ca_bundle {
        let pem = std::fs::read(path)
            .map_err(|e| bad("ca_bundle", format!("{}: {e}", path.display())))?;
        let certs = reqwest::Certificate::from_pem_bundle(&pem)
            .map_err(|e| bad("ca_bundle", format!("{}: {e}", path.display())))?;
        for cert in certs {
            builder = builder.add_root_certificate(cert);
        }
    }
    if let Some(path) = &config.client_certificate {
        let pem = std::fs::read(path)
            .map_err(|e| bad("client_certificate", format!("{}: {e}", path.display())))?;
        let identity = reqwest::Identity::from_pem(&pem)
            .map_err(|e| bad("client_certificate", format!("{}: {e}", path.display())))?;
        builder = builder.identity(identity);
    }
    Ok(builder)
}

/// A secret that cannot be used at startup is a configuration error (the daemon refuses to
/// start); the same problem later, at a token refresh, is an `auth_failed`.
fn startup(e: SecretError) -> ServerError {
    ServerError::Config(e.to_string())
}

/// The section's authentication. Secrets are read (and their modes checked) now, so a
/// misconfigured station refuses to start with the file and the fix.
fn auth_of(config: &ServerConfig, section: &str, base: &Url) -> Result<Auth, ServerError> {
    let key = |k: &str| format!("{section}.{k}");
    let secret = |k: &str, path: &Option<std::path::PathBuf>| -> Result<SecretPath, ServerError> {
        let path = path
            .as_ref()
            .ok_or_else(|| ServerError::Config(format!("{}: required", key(k))))?;
        SecretPath::resolve(&key(k), path).map_err(startup)
    };
    let text = |k: &str, path: &Option<std::path::PathBuf>| -> Result<String, ServerError> {
        secret(k, path)?.read_text().map_err(startup)
    };
    Ok(match config.auth {
        ServerAuth::None => Auth::None,
        ServerAuth::Bearer => Auth::Bearer(text("token_file", &config.token_file)?),
        ServerAuth::Basic => {
            let user = config
                .username
                .clone()
                .ok_or_else(|| ServerError::Config(format!("{}: required", key("username"))))?;
            Auth::Basic(user, text("password_file", &config.password_file)?)
        }
        ServerAuth::Negotiate => {
            let keytab = match &config.keytab {
                Some(_) => {
                    let keytab = secret("keytab", &config.keytab)?;
                    keytab.check_mode().map_err(startup)?;
                    Some(keytab)
                }
                None => None,
            };
            Auth::Negotiate(Arc::new(Negotiator::new(
                base.host_str().unwrap_or_default(),
                config.spn.as_deref(),
                config.principal.as_deref(),
                keytab,
            )))
        }
        ServerAuth::Oauth => Auth::Oauth(Arc::new(token_source(config, section)?)),
    })
}

fn token_source(config: &ServerConfig, section: &str) -> Result<TokenSource, ServerError> {
    let missing = |k: &str| ServerError::Config(format!("{section}.{k}: required"));
    let credential = match (
        &config.client_secret_file,
        &config.client_assertion_certificate,
    ) {
        (Some(path), _) => {
            let secret = SecretPath::resolve(&format!("{section}.client_secret_file"), path)
                .map_err(startup)?;
            secret.read_text().map_err(startup)?;
            ClientCredential::Secret(secret)
        }
        (None, Some(certificate)) => {
            let key_path = config
                .client_assertion_key
                .as_ref()
                .ok_or_else(|| missing("client_assertion_key"))?;
            let key = SecretPath::resolve(&format!("{section}.client_assertion_key"), key_path)
                .map_err(startup)?;
            key.read().map_err(startup)?;
            ClientCredential::Assertion {
                certificate_der: certificate_der(certificate, section)?,
                key,
            }
        }
        (None, None) => return Err(missing("client_secret_file")),
    };
    let audience = match (&config.scope, &config.resource) {
        (Some(scope), _) => Audience::Scope(scope.clone()),
        (None, Some(resource)) => Audience::Resource(resource.clone()),
        (None, None) => return Err(missing("scope")),
    };
    // The token endpoint never redirects a client; following one would send the secret on.
    let http = client_builder(config, section)?
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .map_err(|e| ServerError::Config(e.to_string()))?;
    Ok(TokenSource::new(
        http,
        config
            .token_url
            .clone()
            .ok_or_else(|| missing("token_url"))?,
        config
            .client_id
            .clone()
            .ok_or_else(|| missing("client_id"))?,
        audience,
        credential,
    ))
}

fn certificate_der(path: &std::path::Path, section: &str) -> Result<Vec<u8>, ServerError> {
    let bad = |detail: String| {
        ServerError::Config(format!(
            "{section}.client_assertion_certificate: {}: {detail}",
            path.display()
        ))
    };
    let pem = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
    let (_, pem) = x509_parser::pem::parse_x509_pem(&pem).map_err(|e| bad(e.to_string()))?;
    pem.parse_x509().map_err(|e| bad(e.to_string()))?;
    Ok(pem.contents)
}

/// Runs a blocking GSSAPI call on tokio's blocking pool.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, AuthError> + Send + 'static,
) -> Result<T, AuthError> {
    tokio::task::spawn_blocking(f).await.unwrap_or_else(|e| {
        Err(AuthError::Kerberos {
            spn: String::new(),
            detail: format!("the GSSAPI call did not finish: {e}"),
        })
    })
}

fn replay(request: &RequestBuilder) -> Result<RequestBuilder, ServerError> {
    request
        .try_clone()
        .ok_or_else(|| ServerError::Config("a request body that cannot be sent twice".into()))
}

fn offers(response: &Response) -> negotiate::Challenges {
    negotiate::challenges(
        response
            .headers()
            .get_all(WWW_AUTHENTICATE)
            .iter()
            .filter_map(|v| v.to_str().ok()),
    )
}

/// Whether a first answer is a Negotiate challenge to answer; a server that offers only NTLM is
/// an error that says so, any other answer goes back to the caller as it is.
fn challenged(first: &Response, n: &Negotiator) -> Result<bool, ServerError> {
    if first.status() != StatusCode::UNAUTHORIZED {
        return Ok(false);
    }
    let offered = offers(first);
    match (offered.negotiate.is_some(), offered.ntlm) {
        (true, _) => Ok(true),
        (false, true) => Err(AuthError::NtlmOnly {
            spn: n.spn().to_string(),
        }
        .into()),
        (false, false) => Ok(false),
    }
}

/// Feeds the server's token to the handshake, on the blocking pool.
async fn step(
    n: &Arc<Negotiator>,
    mut handshake: Handshake,
    token: Vec<u8>,
) -> Result<(Handshake, Option<Vec<u8>>), AuthError> {
    let n = n.clone();
    blocking(move || {
        let next = n.step(&mut handshake, &token)?;
        Ok((handshake, next))
    })
    .await
}

fn refused(n: &Negotiator, detail: String) -> ServerError {
    AuthError::TicketRefused {
        spn: n.spn().to_string(),
        detail,
    }
    .into()
}

/// OAuth: the cached token; a `401` drops it and the request is sent once more with a new one.
async fn oauth(tokens: &TokenSource, request: RequestBuilder) -> Result<Response, ServerError> {
    let retry = replay(&request)?;
    let send = |request: RequestBuilder, token: &str| request.bearer_auth(token).send();
    let token = tokens.token().await?;
    let response = send(request, &token.value).await.map_err(classify)?;
    if response.status() != StatusCode::UNAUTHORIZED {
        return Ok(response);
    }
    let _ = read_body(response).await;
    let token = tokens.token_after_rejection(&token).await?;
    let response = send(retry, &token.value).await.map_err(classify)?;
    if response.status() != StatusCode::UNAUTHORIZED {
        return Ok(response);
    }
    let challenge = response
        .headers()
        .get(WWW_AUTHENTICATE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let body = read_body(response).await.unwrap_or_default();
    let detail = challenge
        .unwrap_or_else(|| String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned());
    Err(AuthError::TokenRefused {
        detail: format!("401 after a new token: {detail}"),
    }
    .into())
}

/// Reads a whole answer, refusing one over [`MAX_BODY`].
pub async fn read_body(mut response: Response) -> Result<Vec<u8>, ServerError> {
    let status = response.status().as_u16();
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(classify)? {
        if body.len() + chunk.len() > MAX_BODY {
            return Err(ServerError::BadBody {
                status,
                detail: format!("the answer is larger than {} KiB", MAX_BODY / 1024),
            });
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// 200 ms, 400 ms, 800 ms… plus up to the same again at random, so that many stations
/// retrying after an outage do not hit the server in step.
pub fn backoff(attempt: u32) -> Duration {
    let base = 200u64 << attempt.min(6);
    Duration::from_millis(base + fastrand::u64(0..=base))
}

/// Turns a non-success answer into an error, keeping what the server says about it: the
/// message (MIM CM's `Message`, SCEPman's `errorMessage`), SCEPman's `errorCode`, and the
/// correlation id MIM CM puts in the message of a 500.
pub fn status_error(status: StatusCode, body: &str) -> ServerError {
    let value = serde_json::from_str::<serde_json::Value>(body).ok();
    let member = |names: &[&str]| -> Option<&serde_json::Value> {
        value
            .as_ref()?
            .as_object()?
            .iter()
            .find_map(|(k, v)| names.iter().any(|n| k.eq_ignore_ascii_case(n)).then_some(v))
    };
    let message = match &value {
        Some(serde_json::Value::String(s)) => Some(s.clone()),
        _ => member(&["message", "exceptionmessage", "errormessage"])
            .and_then(|v| v.as_str().map(str::to_string)),
    }
    .unwrap_or_else(|| body.chars().take(200).collect());
    ServerError::Status {
        status: status.as_u16(),
        error_code: member(&["errorcode"]).and_then(serde_json::Value::as_i64),
        correlation_id: correlation_id(&message),
        message,
    }
}

fn correlation_id(text: &str) -> Option<String> {
    static GUID: std::sync::OnceLock<Option<Regex>> = std::sync::OnceLock::new();
    GUID.get_or_init(|| {
        Regex::new(r"(?i)[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}").ok()
    })
    .as_ref()?
    .find(text)
    .map(|m| m.as_str().to_ascii_lowercase())
}

/// Names the failure the way an administrator would look for it: DNS, refused, TLS, timeout.
pub fn classify(e: reqwest::Error) -> ServerError {
    if e.is_timeout() {
        return ServerError::Timeout;
    }
    let chain = crate::error_text::chain(&e);
    let lower = chain.to_lowercase();
    if lower.contains("dns error") || lower.contains("failed to lookup address") {
        ServerError::Dns(chain)
    } else if lower.contains("connection refused") {
        ServerError::Refused(chain)
    } else if lower.contains("certificate") || lower.contains("tls") || lower.contains("handshake")
    {
        ServerError::Tls(chain)
    } else if e.is_decode() {
        ServerError::BadBody {
            status: 0,
            detail: chain,
        }
    } else {
        ServerError::Connect(chain)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_correlation_id_of_a_500() {
        let e = status_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            r#"{"Message":"An error has occurred. Correlation ID: 6F9619FF-8B86-D011-B42D-00C04FC964FF"}"#,
        );
        match &e {
            ServerError::Status {
                status,
                correlation_id,
                ..
            } => {
                assert_eq!(*status, 500);
                assert_eq!(
                    correlation_id.as_deref(),
                    Some("6f9619ff-8b86-d011-b42d-00c04fc964ff")
                );
            }
            other => panic!("{other:?}"),
        }
        assert!(e.to_string().contains("correlation id 6f9619ff"));
        assert!(e.is_transient());
    }

    #[test]
    fn keeps_scepmans_error_code() {
        let e = status_error(
            StatusCode::CONFLICT,
            r#"{"errorMessage":"The certificate is already revoked.","errorCode":5013}"#,
        );
        assert_eq!(
            e,
            ServerError::Status {
                status: 409,
                error_code: Some(5013),
                correlation_id: None,
                message: "The certificate is already revoked.".into(),
            }
        );
        assert!(!e.is_transient());
        assert!(e.to_string().contains("error code 5013"));
    }

    #[test]
    fn backoff_grows_with_jitter() {
        for attempt in 0..4 {
            let d = backoff(attempt).as_millis() as u64;
            let base = 200u64 << attempt;
            assert!((base..=2 * base).contains(&d), "{attempt}: {d}");
        }
    }
}
