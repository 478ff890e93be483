//! What the MIM CM and SCEPman clients share: one `reqwest` client per server (rustls with the
//! system trust store plus an optional CA bundle, optional client certificate, keep-alive,
//! connect and total timeouts, authentication with secrets read from files), error classes an
//! administrator can act on, and the backoff used for retries.

use std::time::Duration;

use regex::Regex;
use reqwest::{Client, RequestBuilder, StatusCode, Url};
use thiserror::Error;

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
        }
    }

    /// Worth another try: the network or the server's health, not the request itself.
    pub fn is_transient(&self) -> bool {
        match self {
            ServerError::Refused(_)
            | ServerError::Connect(_)
            | ServerError::Timeout
            | ServerError::Dns(_) => true,
            ServerError::Status { status, .. } => *status >= 500,
            ServerError::BadBody { .. } | ServerError::Tls(_) | ServerError::Config(_) => false,
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

/// One configured server: the HTTP client, the base URL and how to authenticate.
#[derive(Clone)]
pub struct Server {
    pub http: Client,
    /// API paths are joined to it; it always ends with `/`.
    base: Url,
    auth: Auth,
    /// Extra attempts for idempotent requests after a transient failure.
    pub retries: u32,
}

#[derive(Clone)]
enum Auth {
    None,
    Bearer(String),
    Basic(String, String),
}

impl Server {
    /// Builds the client for the `[section]` of the configuration (`cm`, `scepman`); errors name
    /// the section's key.
    pub fn new(config: &ServerConfig, section: &str) -> Result<Server, ServerError> {
        let bad =
            |key: &str, detail: String| ServerError::Config(format!("{section}.{key}: {detail}"));
        let mut base = Url::parse(&config.base_url).map_err(|e| bad("base_url", e.to_string()))?;
        if !base.path().ends_with('/') {
            base.set_path(&format!("{}/", base.path()));
        }
        let read = |path: &std::path::Path, key: &str| {
            std::fs::read_to_string(path)
                .map(|s| s.trim().to_string())
                .map_err(|e| bad(key, format!("{}: {e}", path.display())))
        };
        let auth = match config.auth {
            ServerAuth::None => Auth::None,
            ServerAuth::Bearer => match &config.token_file {
                Some(path) => Auth::Bearer(read(path, "token_file")?),
                None => return Err(bad("token_file", "required for bearer auth".into())),
            },
            ServerAuth::Basic => match (&config.username, &config.password_file) {
                (Some(user), Some(path)) => Auth::Basic(user.clone(), read(path, "password_file")?),
                _ => {
                    return Err(bad(
                        "username",
                        "username and password_file are required for basic auth".into(),
                    ))
                }
            },
        };
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
        let http = builder
            .build()
            .map_err(|e| ServerError::Config(e.to_string()))?;
        Ok(Server {
            http,
            base,
            auth,
            retries: config.retries,
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
        let response = self.authorize(request).send().await.map_err(classify)?;
        let status = response.status();
        let text = response.text().await.map_err(classify)?;
        if !status.is_success() {
            return Err(status_error(status, &text));
        }
        Ok((status, text))
    }

    pub fn authorize(&self, request: RequestBuilder) -> RequestBuilder {
        match &self.auth {
            Auth::None => request,
            Auth::Bearer(token) => request.bearer_auth(token),
            Auth::Basic(user, password) => request.basic_auth(user, Some(password)),
        }
    }
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
    let mut chain = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        chain.push_str(": ");
        chain.push_str(&s.to_string());
        source = s.source();
    }
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
