//! Configuration: TOML, every key optional unless a feature needs it, unknown keys rejected.
//!
//! Errors name the file and the key (toml's messages carry the key path and position), because
//! an administrator editing `/etc/cardbridge/config.toml` on a kiosk needs to know exactly what to
//! fix. Secrets are never inline: tokens, passwords, client secrets, keys and keytabs are read
//! from files (or systemd credentials, see `auth::secret`), so the configuration itself
//! can be world-readable.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use thiserror::Error;

/// Where `run` and `scan --reconcile` look when no `--config` is given.
pub const DEFAULT_PATH: &str = "/etc/cardbridge/config.toml";

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// SQLite database and other state; `/var/lib/cardbridge` by default.
    pub state_dir: Option<PathBuf>,
    /// `error`, `warn`, `info` (default), `debug` or `trace`; `RUST_LOG` overrides it.
    pub log_level: Option<String>,
    /// Absent: reconciliation reports `not_configured`, and cards cannot be revoked through CM.
    pub cm: Option<ServerConfig>,
    /// The SCEPman Management API. Absent: certificates cannot be revoked through SCEPman.
    pub scepman: Option<ServerConfig>,
    #[serde(default)]
    pub api: ApiConfig,
    #[serde(default)]
    pub revocation: RevocationConfig,
    #[serde(default)]
    pub metrics: MetricsConfig,
}

/// The fleet's metrics listener: `GET /metrics` for a central Prometheus, on any address.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// e.g. `0.0.0.0:9687`; absent, only the API listener serves `/metrics` (with an API token).
    pub listen: Option<SocketAddr>,
    /// SHA-256 (hex) of the bearer token Prometheus must send; absent, no token is asked for.
    pub token_sha256: Option<String>,
    /// PEM certificate chain and private key (a path with mode 0600, or a systemd credential
    /// name) to serve `/metrics` over TLS.
    pub tls_certificate: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// Names (no port) Prometheus may use for this station when no token is set; addresses and
    /// `localhost` are always accepted (see `api::metrics::host_accepted`).
    #[serde(default)]
    pub hosts: Vec<String>,
}

impl MetricsConfig {
    fn check(&self) -> Result<(), String> {
        if self.token_sha256.is_some() && self.listen.is_none() {
            return Err(
                "metrics.token_sha256: set metrics.listen too (the token guards that listener)"
                    .into(),
            );
        }
        if self.tls_certificate.is_some() != self.tls_key.is_some() {
            return Err("metrics.tls_certificate and metrics.tls_key: give both or neither".into());
        }
        if self.tls_certificate.is_some() && self.listen.is_none() {
            return Err("metrics.tls_certificate: set metrics.listen too".into());
        }
        if self
            .token_sha256
            .as_deref()
            .is_some_and(|t| self.token_hash_of(t).is_none())
        {
            return Err(
                "metrics.token_sha256 must be 64 hex digits (the SHA-256 of the token)".into(),
            );
        }
        Ok(())
    }

    /// What is wrong with a metrics listener that other machines can reach: without a token
    /// anyone who reaches it reads the station's metrics, without TLS its token and metrics
    /// travel in clear. `None` on a loopback address, or with both.
    pub fn exposure(&self) -> Option<String> {
        let listen = self.listen.filter(|a| !a.ip().is_loopback())?;
        let missing = match (self.token_sha256.is_some(), self.tls_certificate.is_some()) {
            (true, true) => return None,
            (false, false) => {
                "without a token or TLS: anyone who can reach it reads the \
                               station's metrics (readers, cards, server errors), in clear"
            }
            (false, true) => {
                "without a token: anyone who can reach it reads the station's \
                              metrics (readers, cards, server errors)"
            }
            (true, false) => "without TLS: the token and the metrics travel in clear",
        };
        Some(format!(
            "metrics.listen {listen} is reachable from other machines, {missing}; set \
             metrics.token_sha256 and metrics.tls_certificate / metrics.tls_key, or listen on \
             127.0.0.1"
        ))
    }

    fn token_hash_of(&self, text: &str) -> Option<[u8; 32]> {
        hex::decode(text).ok()?.try_into().ok()
    }

    /// The token hash as bytes (checked at load).
    pub fn token_hash(&self) -> Option<[u8; 32]> {
        self.token_sha256
            .as_deref()
            .and_then(|t| self.token_hash_of(t))
    }
}

/// How the revocation outbox paces its deliveries.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RevocationConfig {
    /// Delay after the first transient failure (timeout, 5xx, connection error); doubled on
    /// each further one, with jitter.
    #[serde(default = "default_retry_initial")]
    pub retry_initial_ms: u64,
    /// The longest delay between two attempts.
    #[serde(default = "default_retry_max")]
    pub retry_max_ms: u64,
    /// How often a MIM CM request is looked at until it is completed, failed or denied.
    #[serde(default = "default_poll_interval")]
    pub poll_interval_ms: u64,
}

impl Default for RevocationConfig {
    fn default() -> Self {
        RevocationConfig {
            retry_initial_ms: default_retry_initial(),
            retry_max_ms: default_retry_max(),
            poll_interval_ms: default_poll_interval(),
        }
    }
}

fn default_retry_initial() -> u64 {
    2_000
}
fn default_retry_max() -> u64 {
    600_000
}
fn default_poll_interval() -> u64 {
    10_000
}

/// The local API (`cardbridge run`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiConfig {
    /// TCP addresses to listen on; loopback only (checked at load).
    #[serde(default = "default_listen")]
    pub listen: Vec<std::net::SocketAddr>,
    /// One entry per calling application. Empty: a random token is generated into the state
    /// directory (`api-token`, mode 0600) with every scope and no browser origin.
    #[serde(default)]
    pub clients: Vec<ApiClient>,
    /// A Unix socket for local programs (e.g. `/run/cardbridge/api.sock`), mode 0660. Callers
    /// need no token: their uid/gid (SO_PEERCRED) is matched against `local_users`.
    pub unix_socket: Option<PathBuf>,
    /// Numeric group the socket is given (the service's own group when absent).
    pub unix_socket_gid: Option<u32>,
    #[serde(default)]
    pub local_users: Vec<LocalUser>,
    /// Revocations a client may submit at once, and then per minute (429 with Retry-After
    /// beyond): each one queues calls to MIM CM or SCEPman.
    #[serde(default = "default_revocation_burst")]
    pub revocation_burst: u32,
    #[serde(default = "default_revocations_per_minute")]
    pub revocations_per_minute: u32,
    /// A request (other than the event stream) must be answered within this, or it is answered
    /// 408 (a body that trickles in counts).
    #[serde(default = "default_request_timeout")]
    pub request_timeout_ms: u64,
    /// Requests handled at once (the event stream aside); one more is answered 503 with
    /// Retry-After instead of waiting.
    #[serde(default = "default_max_concurrent_requests")]
    pub max_concurrent_requests: usize,
}

fn default_request_timeout() -> u64 {
    10_000
}
fn default_max_concurrent_requests() -> usize {
    256
}

fn default_revocation_burst() -> u32 {
    20
}
fn default_revocations_per_minute() -> u32 {
    30
}

impl ApiConfig {
    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.request_timeout_ms)
    }

    /// Listen addresses the Host rule can serve, clients with their own well-formed token
    /// hashes and exact origins, local users that name someone, a revocation budget, request
    /// limits above zero.
    fn check(&self) -> Result<(), String> {
        if self.request_timeout_ms == 0 || self.max_concurrent_requests == 0 {
            return Err(
                "api.request_timeout_ms and api.max_concurrent_requests must be greater than 0"
                    .into(),
            );
        }
        for addr in &self.listen {
            // Only these two: the Host rule accepts 127.0.0.1, localhost and [::1], so another
            // loopback address (127.0.0.2) would refuse every call with 421.
            let usable = addr.ip() == std::net::Ipv4Addr::LOCALHOST
                || addr.ip() == std::net::Ipv6Addr::LOCALHOST;
            if !usable {
                return Err(format!(
                    "api.listen: {addr} is not 127.0.0.1 or [::1]; the local API listens on those loopback addresses only"
                ));
            }
        }
        if self
            .local_users
            .iter()
            .any(|u| u.uid.is_none() && u.gid.is_none())
        {
            return Err("api.local_users: each entry needs a uid or a gid".into());
        }
        if self.revocation_burst == 0 || self.revocations_per_minute == 0 {
            return Err(
                "api.revocation_burst and api.revocations_per_minute: must be greater than 0"
                    .into(),
            );
        }
        let mut hashes = std::collections::HashSet::new();
        let mut names = std::collections::HashSet::new();
        for client in &self.clients {
            client.check()?;
            if !hashes.insert(client.token_sha256.to_ascii_lowercase()) {
                return Err(format!(
                    "api.clients ({}): another client has the same token_sha256; each client needs its own token",
                    client.name
                ));
            }
            if !names.insert(client.name.as_str()) {
                return Err(format!(
                    "api.clients: two clients are named {:?}",
                    client.name
                ));
            }
        }
        Ok(())
    }
}

impl ApiClient {
    fn check(&self) -> Result<(), String> {
        let ok = self.token_sha256.len() == 64
            && self.token_sha256.bytes().all(|b| b.is_ascii_hexdigit());
        if !ok {
            return Err(format!(
                "api.clients ({}): token_sha256 must be 64 hex digits (the SHA-256 of the token)",
                self.name
            ));
        }
        for origin in &self.origins {
            let valid = reqwest::Url::parse(origin)
                .ok()
                .is_some_and(|u| u.origin().ascii_serialization() == *origin);
            if !valid {
                return Err(format!(
                    "api.clients ({}): origin {origin:?} must be exactly scheme://host[:port]",
                    self.name
                ));
            }
        }
        Ok(())
    }
}

/// Scopes for processes connecting over the Unix socket, by user id or group id.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalUser {
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub scopes: Vec<Scope>,
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            listen: default_listen(),
            clients: Vec::new(),
            unix_socket: None,
            unix_socket_gid: None,
            local_users: Vec::new(),
            revocation_burst: default_revocation_burst(),
            revocations_per_minute: default_revocations_per_minute(),
            request_timeout_ms: default_request_timeout(),
            max_concurrent_requests: default_max_concurrent_requests(),
        }
    }
}

fn default_listen() -> Vec<std::net::SocketAddr> {
    vec![std::net::SocketAddr::from(([127, 0, 0, 1], 8687))]
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiClient {
    pub name: String,
    /// Hex SHA-256 of the bearer token; the token itself is never stored.
    pub token_sha256: String,
    pub scopes: Vec<Scope>,
    /// Exact origins (`https://kiosk.contoso.com`) a browser page of this client may call from.
    #[serde(default)]
    pub origins: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    Read,
    Sync,
    Revoke,
}

impl Scope {
    /// The name in the configuration and the API.
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Read => "read",
            Scope::Sync => "sync",
            Scope::Revoke => "revoke",
        }
    }
}

/// A server cardbridge calls: `[cm]` (MIM CM) or `[scepman]` (SCEPman Management API).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// e.g. `https://cm.contoso.com/CertificateManagement/` or `https://scepman.contoso.com/`
    pub base_url: String,
    #[serde(default)]
    pub auth: ServerAuth,
    /// File holding the bearer token (`auth = "bearer"`).
    pub token_file: Option<PathBuf>,
    /// User name for `auth = "basic"`.
    pub username: Option<String>,
    /// File holding the password for `auth = "basic"`.
    pub password_file: Option<PathBuf>,
    /// PEM file with extra CA certificates to trust (an internal PKI).
    pub ca_bundle: Option<PathBuf>,
    /// PEM file with a client certificate and its private key, for mutual TLS.
    pub client_certificate: Option<PathBuf>,
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout_ms: u64,
    #[serde(default = "default_timeout")]
    pub timeout_ms: u64,
    /// Extra attempts for GET requests after a transient failure.
    #[serde(default = "default_retries")]
    pub retries: u32,
    /// `[cm]` only: byte order of the PIV card id as the server knows it; absent or `auto`
    /// tries both.
    pub card_id_order: Option<CardIdOrder>,
    /// `[scepman]` only: how long SCEPman's answer about a certificate is reused before it is
    /// asked again (a sync and a revocation always ask again). Default 300.
    pub status_cache_seconds: Option<u64>,
    /// `auth = "negotiate"`: the station's client keytab (a path, or a credential name in
    /// `$CREDENTIALS_DIRECTORY`). Absent: `KRB5_CLIENT_KTNAME`, the default client keytab, or
    /// the credential cache.
    pub keytab: Option<PathBuf>,
    /// `auth = "negotiate"`: the client principal (default: the keytab's first principal).
    pub principal: Option<String>,
    /// `auth = "negotiate"`: the server's principal, `HTTP/<host>` (default: the host of
    /// `base_url`).
    pub spn: Option<String>,
    /// `auth = "oauth"`: the token endpoint (Entra ID v2 or AD FS).
    pub token_url: Option<String>,
    /// `auth = "oauth"`: the application (client) id.
    pub client_id: Option<String>,
    /// `auth = "oauth"`, Entra ID v2: `api://<app id>/.default`.
    pub scope: Option<String>,
    /// `auth = "oauth"`, AD FS: the relying party identifier.
    pub resource: Option<String>,
    /// `auth = "oauth"`: file (or credential name) holding the client secret.
    pub client_secret_file: Option<PathBuf>,
    /// `auth = "oauth"`: PEM certificate registered for the application, for a signed client
    /// assertion instead of a secret.
    pub client_assertion_certificate: Option<PathBuf>,
    /// `auth = "oauth"`: PEM private key of that certificate (a path or a credential name).
    pub client_assertion_key: Option<PathBuf>,
}

impl ServerConfig {
    /// How long a SCEPman certificate status is reused.
    pub fn status_cache(&self) -> Duration {
        Duration::from_secs(self.status_cache_seconds.unwrap_or(300))
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ServerAuth {
    #[default]
    None,
    Bearer,
    Basic,
    /// HTTP Negotiate with Kerberos (SPNEGO), from the station's keytab.
    Negotiate,
    /// OAuth 2.0 client credentials (Entra ID or AD FS).
    Oauth,
}

impl ServerAuth {
    pub fn as_str(self) -> &'static str {
        match self {
            ServerAuth::None => "none",
            ServerAuth::Bearer => "bearer",
            ServerAuth::Basic => "basic",
            ServerAuth::Negotiate => "negotiate",
            ServerAuth::Oauth => "oauth",
        }
    }
}

/// How the 16 card-id bytes are written as the GUID string the server is asked about.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CardIdOrder {
    /// Windows GUID order first (how Windows prints a card id), RFC 4122 order second; the form
    /// that answered is remembered.
    #[default]
    Auto,
    Rfc4122,
    Windows,
}

fn default_connect_timeout() -> u64 {
    3_000
}
fn default_timeout() -> u64 {
    10_000
}
fn default_retries() -> u32 {
    2
}

impl ServerConfig {
    /// Checks what TOML types cannot: the URL, the keys each auth needs (and no key of another
    /// auth, which would be a mistake that passes silently), the timeouts.
    fn check(&self, section: &str) -> Result<(), String> {
        let url =
            reqwest::Url::parse(&self.base_url).map_err(|e| format!("{section}.base_url: {e}"))?;
        if !matches!(url.scheme(), "https" | "http") {
            return Err(format!("{section}.base_url: must be an http or https URL"));
        }
        if self.timeout_ms == 0 || self.connect_timeout_ms == 0 {
            return Err(format!(
                "{section}.timeout_ms and {section}.connect_timeout_ms: must be greater than 0"
            ));
        }
        for (key, wanted) in self.auth_keys() {
            if wanted != self.auth {
                return Err(format!(
                    "{section}.{key}: only used with {section}.auth = \"{}\" (auth is \"{}\")",
                    wanted.as_str(),
                    self.auth.as_str()
                ));
            }
        }
        let required = |key: &str| {
            format!(
                "{section}.{key}: required when {section}.auth = \"{}\"",
                self.auth.as_str()
            )
        };
        match self.auth {
            ServerAuth::None => Ok(()),
            ServerAuth::Bearer if self.token_file.is_none() => Err(required("token_file")),
            ServerAuth::Basic if self.username.is_none() || self.password_file.is_none() => {
                Err(required("username and password_file"))
            }
            ServerAuth::Bearer | ServerAuth::Basic => Ok(()),
            ServerAuth::Negotiate => self.check_negotiate(section),
            ServerAuth::Oauth => self.check_oauth(section, &required),
        }
    }

    /// The authentication keys that are set, with the auth they belong to.
    fn auth_keys(&self) -> Vec<(&'static str, ServerAuth)> {
        use ServerAuth::{Basic, Bearer, Negotiate, Oauth};
        let set = [
            ("token_file", self.token_file.is_some(), Bearer),
            ("username", self.username.is_some(), Basic),
            ("password_file", self.password_file.is_some(), Basic),
            ("keytab", self.keytab.is_some(), Negotiate),
            ("principal", self.principal.is_some(), Negotiate),
            ("spn", self.spn.is_some(), Negotiate),
            ("token_url", self.token_url.is_some(), Oauth),
            ("client_id", self.client_id.is_some(), Oauth),
            ("scope", self.scope.is_some(), Oauth),
            ("resource", self.resource.is_some(), Oauth),
            (
                "client_secret_file",
                self.client_secret_file.is_some(),
                Oauth,
            ),
            (
                "client_assertion_certificate",
                self.client_assertion_certificate.is_some(),
                Oauth,
            ),
            (
                "client_assertion_key",
                self.client_assertion_key.is_some(),
                Oauth,
            ),
        ];
        set.into_iter()
            .filter(|(_, present, _)| *present)
            .map(|(key, _, auth)| (key, auth))
            .collect()
    }

    fn check_negotiate(&self, section: &str) -> Result<(), String> {
        if let Some(spn) = &self.spn {
            let valid = spn
                .split_once('/')
                .is_some_and(|(service, host)| !service.is_empty() && !host.is_empty());
            if !valid || spn.chars().any(char::is_whitespace) {
                return Err(format!(
                    "{section}.spn: {spn:?} is not a service principal; write it as HTTP/<host>, e.g. HTTP/cm.contoso.com"
                ));
            }
        }
        if self.principal.as_deref().is_some_and(str::is_empty) {
            return Err(format!("{section}.principal: must not be empty"));
        }
        Ok(())
    }

    fn check_oauth(&self, section: &str, required: &dyn Fn(&str) -> String) -> Result<(), String> {
        let token_url = self
            .token_url
            .as_deref()
            .ok_or_else(|| required("token_url"))?;
        let url =
            reqwest::Url::parse(token_url).map_err(|e| format!("{section}.token_url: {e}"))?;
        if !matches!(url.scheme(), "https" | "http") {
            return Err(format!("{section}.token_url: must be an http or https URL"));
        }
        if self.client_id.as_deref().is_none_or(str::is_empty) {
            return Err(required("client_id"));
        }
        if self.scope.is_some() == self.resource.is_some() {
            return Err(format!(
                "{section}.scope or {section}.resource: exactly one is required with {section}.auth = \"oauth\" (scope for Entra ID, resource for AD FS)"
            ));
        }
        let assertion = (
            self.client_assertion_certificate.is_some(),
            self.client_assertion_key.is_some(),
        );
        match (self.client_secret_file.is_some(), assertion) {
            (true, (false, false)) | (false, (true, true)) => Ok(()),
            (false, (false, false)) => Err(format!(
                "{section}.client_secret_file, or {section}.client_assertion_certificate with {section}.client_assertion_key: required when {section}.auth = \"oauth\""
            )),
            (true, _) => Err(format!(
                "{section}.client_secret_file: use either a client secret or a client assertion certificate, not both"
            )),
            (false, _) => Err(format!(
                "{section}.client_assertion_certificate and {section}.client_assertion_key: both are needed for a client assertion"
            )),
        }
    }

    pub fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.connect_timeout_ms)
    }
    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }
}

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("cannot read the configuration {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid configuration {path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

impl Config {
    /// Loads `path`. A missing file at the default path means "all defaults"; a missing file
    /// that was asked for explicitly is an error.
    pub fn load(path: &Path, explicit: bool) -> Result<Config, ConfigError> {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => {
                return Ok(Config::default())
            }
            Err(source) => {
                return Err(ConfigError::Read {
                    path: path.to_path_buf(),
                    source,
                })
            }
        };
        Config::parse(&text).map_err(|message| ConfigError::Invalid {
            path: path.to_path_buf(),
            message,
        })
    }

    /// Parses and validates configuration text.
    pub fn parse(text: &str) -> Result<Config, String> {
        let config: Config =
            toml::from_str(text).map_err(|e| e.to_string().trim().replace('\n', " "))?;
        config.api.check()?;
        config.metrics.check()?;
        for (section, server) in [("cm", &config.cm), ("scepman", &config.scepman)] {
            if let Some(server) = server {
                server.check(section)?;
            }
        }
        config.check_rest()?;
        Ok(config)
    }

    /// What the API and server sections do not check: the log level, the outbox pacing, one
    /// keytab per station, the card id order's place.
    fn check_rest(&self) -> Result<(), String> {
        if let Some(level) = &self.log_level {
            if !["error", "warn", "info", "debug", "trace"].contains(&level.as_str()) {
                return Err(format!(
                    "log_level: {level:?} is not one of error, warn, info, debug, trace"
                ));
            }
        }
        let r = &self.revocation;
        if r.retry_initial_ms == 0 || r.poll_interval_ms == 0 || r.retry_max_ms < r.retry_initial_ms
        {
            return Err("revocation: retry_initial_ms and poll_interval_ms must be greater than 0, and retry_max_ms at least retry_initial_ms".into());
        }
        let keytabs: Vec<&PathBuf> = [&self.cm, &self.scepman]
            .into_iter()
            .flatten()
            .filter_map(|s| s.keytab.as_ref())
            .collect();
        if keytabs.windows(2).any(|pair| pair[0] != pair[1]) {
            return Err("cm.keytab and scepman.keytab: one station has one client keytab; name the same file in both sections (or leave it out of one)".into());
        }
        if self
            .scepman
            .as_ref()
            .is_some_and(|s| s.card_id_order.is_some())
        {
            return Err("scepman.card_id_order: only the [cm] section has a card id order".into());
        }
        if self
            .cm
            .as_ref()
            .is_some_and(|c| c.status_cache_seconds.is_some())
        {
            return Err(
                "cm.status_cache_seconds: only the [scepman] section caches certificate statuses"
                    .into(),
            );
        }
        Ok(())
    }

    pub fn state_dir(&self) -> PathBuf {
        self.state_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from("/var/lib/cardbridge"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_full_cm_section() {
        let c = Config::parse("").unwrap();
        assert!(c.cm.is_none());
        let c = Config::parse(
            "state_dir = \"/tmp/x\"\n[cm]\nbase_url = \"https://cm.contoso.com/CertificateManagement/\"\n\
             auth = \"basic\"\nusername = \"svc\"\npassword_file = \"/etc/cardbridge/cm.pw\"\ncard_id_order = \"windows\"\n",
        )
        .unwrap();
        let cm = c.cm.unwrap();
        assert_eq!(cm.auth, ServerAuth::Basic);
        assert_eq!(cm.card_id_order, Some(CardIdOrder::Windows));
        assert_eq!(cm.retries, 2);
    }

    #[test]
    fn the_example_configuration_is_valid() {
        let text = include_str!("../service/config.example.toml");
        let c = Config::parse(text).unwrap();
        assert_eq!(c.state_dir(), PathBuf::from("/var/lib/cardbridge"));
        assert_eq!(c.cm.unwrap().card_id_order, Some(CardIdOrder::Auto));
        assert!(c.scepman.is_some());
        assert_eq!(c.api.listen, default_listen());
    }

    #[test]
    fn the_installed_configuration_is_valid() {
        let c = Config::parse(include_str!("../service/config.toml")).unwrap();
        assert!(c.cm.is_none());
        assert_eq!(
            c.api.unix_socket.as_deref(),
            Some(Path::new("/run/cardbridge/api.sock"))
        );
        assert_eq!(c.api.local_users[0].uid, Some(0));
    }

    #[test]
    fn api_listeners_are_loopback_only_and_clients_are_checked() {
        let c = Config::parse("[api]\nlisten = [\"127.0.0.1:9000\", \"[::1]:9000\"]\n").unwrap();
        assert_eq!(c.api.listen.len(), 2);
        let e = Config::parse("[api]\nlisten = [\"0.0.0.0:8687\"]\n").unwrap_err();
        assert!(e.contains("api.listen") && e.contains("loopback"), "{e}");
        let e = Config::parse("[api]\nlisten = [\"127.0.0.2:8687\"]\n").unwrap_err();
        assert!(e.contains("127.0.0.2"), "{e}");
        let client = |hash: &str, origin: &str| {
            format!("[[api.clients]]\nname = \"kiosk\"\ntoken_sha256 = \"{hash}\"\nscopes = [\"read\"]\norigins = [\"{origin}\"]\n")
        };
        let hash = "ab".repeat(32);
        assert!(Config::parse(&client(&hash, "https://kiosk.contoso.com")).is_ok());
        assert!(Config::parse(&client("abc", "https://kiosk.contoso.com"))
            .unwrap_err()
            .contains("token_sha256"));
        assert!(Config::parse(&client(&hash, "https://kiosk.contoso.com/"))
            .unwrap_err()
            .contains("origin"));
        assert!(Config::parse(&client(&hash, "*"))
            .unwrap_err()
            .contains("origin"));
        let twice = format!(
            "{}{}",
            client(&hash, "https://a.contoso.com"),
            client(&hash.to_uppercase(), "https://b.contoso.com").replace("kiosk", "admin")
        );
        assert!(Config::parse(&twice)
            .unwrap_err()
            .contains("same token_sha256"));
        let other = "cd".repeat(32);
        let same_name = format!(
            "{}{}",
            client(&hash, "https://a.contoso.com"),
            client(&other, "https://b.contoso.com")
        );
        assert!(Config::parse(&same_name)
            .unwrap_err()
            .contains("two clients are named"));
    }

    #[test]
    fn rejects_unknown_keys_and_bad_values_naming_the_key() {
        let e = Config::parse("[cm]\nbase_url = \"https://x/\"\nretry = 3\n").unwrap_err();
        assert!(e.contains("retry"), "{e}");
        let e = Config::parse("[cm]\nbase_url = \"not a url\"\n").unwrap_err();
        assert!(e.contains("cm.base_url"), "{e}");
        let e = Config::parse("[cm]\nbase_url = \"https://x/\"\nauth = \"bearer\"\n").unwrap_err();
        assert!(e.contains("cm.token_file"), "{e}");
        let e =
            Config::parse("[cm]\nbase_url = \"https://x/\"\nauth = \"kerberos\"\n").unwrap_err();
        assert!(e.contains("kerberos"), "{e}");
        let e = Config::parse("[scepman]\nbase_url = \"ftp://x/\"\n").unwrap_err();
        assert!(e.contains("scepman.base_url"), "{e}");
        let e =
            Config::parse("[scepman]\nbase_url = \"https://x/\"\ncard_id_order = \"windows\"\n")
                .unwrap_err();
        assert!(e.contains("scepman.card_id_order"), "{e}");
        let e = Config::parse("log_level = \"loud\"\n").unwrap_err();
        assert!(e.contains("log_level"), "{e}");
        let e = Config::parse("[revocation]\nretry_initial_ms = 0\n").unwrap_err();
        assert!(e.contains("revocation"), "{e}");
        let e = Config::parse("[revocation]\nretries = 3\n").unwrap_err();
        assert!(e.contains("retries"), "{e}");
    }

    #[test]
    fn authentication_keys_are_checked_against_the_chosen_method() {
        let base = "[scepman]\nbase_url = \"https://scepman.contoso.com/\"\n";
        let oauth = "auth = \"oauth\"\ntoken_url = \"https://login.microsoftonline.com/t/oauth2/v2.0/token\"\nclient_id = \"6c1b\"\n";
        let ok = |extra: &str| Config::parse(&format!("{base}{extra}"));
        assert!(ok(&format!(
            "{oauth}scope = \"api://x/.default\"\nclient_secret_file = \"scepman-secret\"\n"
        ))
        .is_ok());
        assert!(ok(&format!("{oauth}resource = \"https://x\"\nclient_assertion_certificate = \"/a.pem\"\nclient_assertion_key = \"a.key\"\n")).is_ok());
        let err = |extra: &str| ok(extra).unwrap_err();
        let e = err(&format!("{oauth}client_secret_file = \"s\"\n"));
        assert!(e.contains("scepman.scope or scepman.resource"), "{e}");
        let e = err(&format!(
            "{oauth}scope = \"a\"\nresource = \"b\"\nclient_secret_file = \"s\"\n"
        ));
        assert!(e.contains("exactly one"), "{e}");
        let e = err(&format!("{oauth}scope = \"a\"\n"));
        assert!(e.contains("scepman.client_secret_file"), "{e}");
        let e = err(&format!(
            "{oauth}scope = \"a\"\nclient_assertion_certificate = \"/a.pem\"\n"
        ));
        assert!(e.contains("both are needed"), "{e}");
        let e = err("auth = \"oauth\"\nclient_id = \"x\"\n");
        assert!(e.contains("scepman.token_url: required"), "{e}");
        let e = err("auth = \"negotiate\"\nclient_id = \"x\"\n");
        assert!(
            e.contains("scepman.client_id: only used with scepman.auth = \"oauth\""),
            "{e}"
        );
        let e = err("keytab = \"/etc/cardbridge/station.keytab\"\n");
        assert!(
            e.contains("only used with scepman.auth = \"negotiate\""),
            "{e}"
        );
        let e = err("auth = \"negotiate\"\nspn = \"cm.contoso.com\"\n");
        assert!(e.contains("HTTP/<host>"), "{e}");
        let e = err("auth = \"negotiate\"\nkeytb = \"/k\"\n");
        assert!(
            e.contains("unknown field `keytb`") && e.contains("keytab"),
            "{e}"
        );
        assert!(ok("auth = \"negotiate\"\nspn = \"HTTP/cm.contoso.com@CONTOSO.COM\"\nprincipal = \"ST01$@CONTOSO.COM\"\n").is_ok());
    }

    #[test]
    fn one_station_has_one_keytab() {
        let section = |name: &str, keytab: &str| {
            format!("[{name}]\nbase_url = \"https://{name}.contoso.com/\"\nauth = \"negotiate\"\nkeytab = \"{keytab}\"\n")
        };
        let same = format!("{}{}", section("cm", "/k"), section("scepman", "/k"));
        assert!(Config::parse(&same).is_ok());
        let two = format!("{}{}", section("cm", "/k"), section("scepman", "/other"));
        assert!(Config::parse(&two)
            .unwrap_err()
            .contains("one client keytab"));
    }
}
