//! The MIM CM REST client.
//!
//! One shared `reqwest` client (rustls, keep-alive) per server. It accepts what the real server
//! does rather than what its documentation promises: 204 for "nothing found", a single object
//! where a list may come, braced GUIDs and lower-case ATRs (normalised by [`model`]), bare JSON
//! strings as POST results, and 500s whose message carries a correlation id (kept in the error
//! so an administrator can find the server's event-log entry). GET requests are retried with
//! exponential backoff and jitter on transient failures; POST never is, because a request
//! created twice is a real problem.

pub mod model;

use std::time::Duration;

use regex::Regex;
use reqwest::{Client, Method, RequestBuilder, StatusCode, Url};
use serde::de::DeserializeOwned;
use thiserror::Error;

use crate::config::{CmAuth, CmConfig};
pub use model::{NewRequest, Request, Smartcard, X509ClmCertificate};

/// Why a CM call failed. [`CmError::code`] is stable, for the reconciliation's `reason`.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum CmError {
    #[error("invalid CM configuration: {0}")]
    Config(String),
    #[error("cannot resolve the CM server's name: {0}")]
    Dns(String),
    #[error("the CM server refused the connection: {0}")]
    Refused(String),
    #[error("TLS with the CM server failed: {0}")]
    Tls(String),
    #[error("cannot connect to the CM server: {0}")]
    Connect(String),
    #[error("the CM server did not answer in time")]
    Timeout,
    #[error("the CM server answered {status}{}: {message}", correlation_id.as_ref().map(|c| format!(" (correlation id {c})")).unwrap_or_default())]
    Status {
        status: u16,
        correlation_id: Option<String>,
        message: String,
    },
    #[error("the CM server answered {status} with a body that is not the expected JSON: {detail}")]
    BadBody { status: u16, detail: String },
}

impl CmError {
    pub fn code(&self) -> &'static str {
        match self {
            CmError::Config(_) => "config",
            CmError::Dns(_) => "dns",
            CmError::Refused(_) => "connection_refused",
            CmError::Tls(_) => "tls",
            CmError::Connect(_) => "connect",
            CmError::Timeout => "timeout",
            CmError::Status { .. } => "http_status",
            CmError::BadBody { .. } => "bad_body",
        }
    }

    /// Worth another try: the network or the server's health, not the request itself.
    fn is_transient(&self) -> bool {
        match self {
            CmError::Refused(_) | CmError::Connect(_) | CmError::Timeout | CmError::Dns(_) => true,
            CmError::Status { status, .. } => *status >= 500,
            CmError::BadBody { .. } | CmError::Tls(_) | CmError::Config(_) => false,
        }
    }
}

/// A client for one MIM CM server.
#[derive(Clone)]
pub struct CmClient {
    http: Client,
    /// The `…/CertificateManagement/` base; API paths are joined to it.
    base: Url,
    auth: Auth,
    retries: u32,
}

#[derive(Clone)]
enum Auth {
    None,
    Bearer(String),
    Basic(String, String),
}

impl CmClient {
    pub fn new(config: &CmConfig) -> Result<CmClient, CmError> {
        let mut base = Url::parse(&config.base_url)
            .map_err(|e| CmError::Config(format!("cm.base_url: {e}")))?;
        if !base.path().ends_with('/') {
            base.set_path(&format!("{}/", base.path()));
        }
        let read = |path: &std::path::Path, key: &str| {
            std::fs::read_to_string(path)
                .map(|s| s.trim().to_string())
                .map_err(|e| CmError::Config(format!("cm.{key} {}: {e}", path.display())))
        };
        let auth = match config.auth {
            CmAuth::None => Auth::None,
            CmAuth::Bearer => match &config.token_file {
                Some(path) => Auth::Bearer(read(path, "token_file")?),
                None => {
                    return Err(CmError::Config(
                        "cm.token_file is required for bearer auth".into(),
                    ))
                }
            },
            CmAuth::Basic => match (&config.username, &config.password_file) {
                (Some(user), Some(path)) => Auth::Basic(user.clone(), read(path, "password_file")?),
                _ => {
                    return Err(CmError::Config(
                        "cm.username and cm.password_file are required for basic auth".into(),
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
                .map_err(|e| CmError::Config(format!("cm.ca_bundle {}: {e}", path.display())))?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem)
                .map_err(|e| CmError::Config(format!("cm.ca_bundle {}: {e}", path.display())))?;
            for cert in certs {
                builder = builder.add_root_certificate(cert);
            }
        }
        if let Some(path) = &config.client_certificate {
            let pem = std::fs::read(path).map_err(|e| {
                CmError::Config(format!("cm.client_certificate {}: {e}", path.display()))
            })?;
            let identity = reqwest::Identity::from_pem(&pem).map_err(|e| {
                CmError::Config(format!("cm.client_certificate {}: {e}", path.display()))
            })?;
            builder = builder.identity(identity);
        }
        let http = builder
            .build()
            .map_err(|e| CmError::Config(e.to_string()))?;
        Ok(CmClient {
            http,
            base,
            auth,
            retries: config.retries,
        })
    }

    /// `GET api/v1.0/smartcards?cardid=…`: the cards whose SerialNumber is this card id.
    pub async fn find_smartcards(&self, card_id: &str) -> Result<Vec<Smartcard>, CmError> {
        self.get_list("api/v1.0/smartcards", &[("cardid", card_id)])
            .await
    }

    /// `GET api/v1.0/smartcards/{uuid}`.
    pub async fn smartcard(&self, uuid: &str) -> Result<Option<Smartcard>, CmError> {
        Ok(self
            .get_list(&format!("api/v1.0/smartcards/{uuid}"), &[])
            .await?
            .into_iter()
            .next())
    }

    /// `GET api/v1.0/smartcards/{uuid}/certificates`.
    pub async fn certificates(&self, uuid: &str) -> Result<Vec<X509ClmCertificate>, CmError> {
        self.get_list(&format!("api/v1.0/smartcards/{uuid}/certificates"), &[])
            .await
    }

    /// `GET api/v1.0/smartcards/{uuid}/operations`, lower-cased.
    pub async fn operations(&self, uuid: &str) -> Result<Vec<String>, CmError> {
        let ops: Vec<String> = self
            .get_list(&format!("api/v1.0/smartcards/{uuid}/operations"), &[])
            .await?;
        Ok(ops.into_iter().map(|o| o.to_ascii_lowercase()).collect())
    }

    /// `GET api/v1.0/requests/{id}`.
    pub async fn request(&self, id: &str) -> Result<Option<Request>, CmError> {
        Ok(self
            .get_list(&format!("api/v1.0/requests/{id}"), &[])
            .await?
            .into_iter()
            .next())
    }

    /// `POST api/v1.0/requests`; returns the new request's URI as the server gave it (a bare JSON
    /// string such as `"api/v1.0/requests/a9b4…"`). Never retried.
    pub async fn create_request(&self, body: &NewRequest) -> Result<String, CmError> {
        let url = self.url("api/v1.0/requests")?;
        let response = self
            .authorize(self.http.request(Method::POST, url).json(body))
            .send()
            .await
            .map_err(classify)?;
        let status = response.status();
        let text = response.text().await.map_err(classify)?;
        if !status.is_success() {
            return Err(status_error(status, &text));
        }
        serde_json::from_str::<String>(&text).map_err(|e| CmError::BadBody {
            status: status.as_u16(),
            detail: format!("expected a JSON string: {e}"),
        })
    }

    /// A GET whose answer may be 204 (nothing), one object, or an array of them.
    async fn get_list<T: DeserializeOwned>(
        &self,
        path: &str,
        query: &[(&str, &str)],
    ) -> Result<Vec<T>, CmError> {
        let mut attempt = 0;
        loop {
            match self.get_once(path, query).await {
                Err(e) if e.is_transient() && attempt < self.retries => {
                    tokio::time::sleep(backoff(attempt)).await;
                    attempt += 1;
                }
                other => return other,
            }
        }
    }

    async fn get_once<T: DeserializeOwned>(
        &self,
        path: &str,
        query: &[(&str, &str)],
    ) -> Result<Vec<T>, CmError> {
        let mut url = self.url(path)?;
        if !query.is_empty() {
            url.query_pairs_mut().extend_pairs(query);
        }
        let response = self
            .authorize(self.http.get(url))
            .send()
            .await
            .map_err(classify)?;
        let status = response.status();
        let bytes = response.bytes().await.map_err(classify)?;
        // hyper hands an HTTP/1 connection back to the pool from a task of its own once the body
        // is read. Yielding lets that task run before the next request of this lookup looks for
        // an idle connection; otherwise, on a fast network, opening a new one can win the race.
        tokio::task::yield_now().await;
        if status == StatusCode::NO_CONTENT
            || (status.is_success() && bytes.iter().all(u8::is_ascii_whitespace))
        {
            return Ok(Vec::new());
        }
        if !status.is_success() {
            return Err(status_error(status, &String::from_utf8_lossy(&bytes)));
        }
        let value: serde_json::Value =
            serde_json::from_slice(&bytes).map_err(|e| CmError::BadBody {
                status: status.as_u16(),
                detail: format!("not JSON ({e})"),
            })?;
        let items = match value {
            serde_json::Value::Array(items) => items,
            serde_json::Value::Null => Vec::new(),
            single => vec![single],
        };
        items
            .into_iter()
            .map(serde_json::from_value)
            .collect::<Result<_, _>>()
            .map_err(|e| CmError::BadBody {
                status: status.as_u16(),
                detail: e.to_string(),
            })
    }

    fn url(&self, path: &str) -> Result<Url, CmError> {
        self.base
            .join(path)
            .map_err(|e| CmError::Config(format!("cannot build the URL for {path}: {e}")))
    }

    fn authorize(&self, request: RequestBuilder) -> RequestBuilder {
        match &self.auth {
            Auth::None => request,
            Auth::Bearer(token) => request.bearer_auth(token),
            Auth::Basic(user, password) => request.basic_auth(user, Some(password)),
        }
    }
}

/// 200 ms, 400 ms, 800 ms… plus up to the same again at random, so that many stations
/// retrying after an outage do not hit the server in step.
fn backoff(attempt: u32) -> Duration {
    let base = 200u64 << attempt.min(6);
    Duration::from_millis(base + fastrand::u64(0..=base))
}

/// Turns a non-success answer into an error, keeping the correlation id that CM puts in the
/// message of a 500.
fn status_error(status: StatusCode, body: &str) -> CmError {
    let message = serde_json::from_str::<serde_json::Value>(body)
        .ok()
        .and_then(|v| match v {
            serde_json::Value::String(s) => Some(s),
            serde_json::Value::Object(map) => map
                .iter()
                .find(|(k, _)| {
                    k.eq_ignore_ascii_case("message") || k.eq_ignore_ascii_case("exceptionmessage")
                })
                .and_then(|(_, v)| v.as_str().map(str::to_string)),
            _ => None,
        })
        .unwrap_or_else(|| body.chars().take(200).collect());
    CmError::Status {
        status: status.as_u16(),
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
fn classify(e: reqwest::Error) -> CmError {
    if e.is_timeout() {
        return CmError::Timeout;
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
        CmError::Dns(chain)
    } else if lower.contains("connection refused") {
        CmError::Refused(chain)
    } else if lower.contains("certificate") || lower.contains("tls") || lower.contains("handshake")
    {
        CmError::Tls(chain)
    } else if e.is_decode() {
        CmError::BadBody {
            status: 0,
            detail: chain,
        }
    } else {
        CmError::Connect(chain)
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
            CmError::Status {
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
    fn backoff_grows_with_jitter() {
        for attempt in 0..4 {
            let d = backoff(attempt).as_millis() as u64;
            let base = 200u64 << attempt;
            assert!((base..=2 * base).contains(&d), "{attempt}: {d}");
        }
    }
}
