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

use reqwest::{Method, StatusCode};
use serde::de::DeserializeOwned;

use crate::config::ServerConfig;
use crate::http::{backoff, read_body, status_error, Server, ServerError};
pub use model::{NewRequest, Request, Smartcard, X509ClmCertificate};

/// A client for one MIM CM server (its base is the `…/CertificateManagement/` URL).
#[derive(Clone)]
pub struct CmClient {
    server: Server,
}

impl CmClient {
    pub fn new(config: &ServerConfig) -> Result<CmClient, ServerError> {
        Ok(CmClient {
            server: Server::new(config, "cm")?,
        })
    }

    /// The HTTP layer of this client (authentication details for `check-config --online`).
    pub fn server(&self) -> &Server {
        &self.server
    }

    /// `GET api/v1.0/smartcards?cardid=…`: the cards whose SerialNumber is this card id.
    pub async fn find_smartcards(&self, card_id: &str) -> Result<Vec<Smartcard>, ServerError> {
        self.get_list("api/v1.0/smartcards", &[("cardid", card_id)])
            .await
    }

    /// `GET api/v1.0/smartcards/{uuid}`.
    pub async fn smartcard(&self, uuid: &str) -> Result<Option<Smartcard>, ServerError> {
        Ok(self
            .get_list(&format!("api/v1.0/smartcards/{uuid}"), &[])
            .await?
            .into_iter()
            .next())
    }

    /// `GET api/v1.0/smartcards/{uuid}/certificates`.
    pub async fn certificates(&self, uuid: &str) -> Result<Vec<X509ClmCertificate>, ServerError> {
        self.get_list(&format!("api/v1.0/smartcards/{uuid}/certificates"), &[])
            .await
    }

    /// `GET api/v1.0/smartcards/{uuid}/operations`, lower-cased.
    pub async fn operations(&self, uuid: &str) -> Result<Vec<String>, ServerError> {
        let ops: Vec<String> = self
            .get_list(&format!("api/v1.0/smartcards/{uuid}/operations"), &[])
            .await?;
        Ok(ops.into_iter().map(|o| o.to_ascii_lowercase()).collect())
    }

    /// `GET api/v1.0/requests/{id}`.
    pub async fn request(&self, id: &str) -> Result<Option<Request>, ServerError> {
        Ok(self
            .get_list(&format!("api/v1.0/requests/{id}"), &[])
            .await?
            .into_iter()
            .next())
    }

    /// `GET api/v1.0/requests`: the requests the service account can see, every status.
    pub async fn requests(&self) -> Result<Vec<Request>, ServerError> {
        self.get_list("api/v1.0/requests", &[]).await
    }

    /// `POST api/v1.0/requests`; returns the new request's URI as the server gave it (a bare JSON
    /// string such as `"api/v1.0/requests/a9b4…"`). Never retried.
    pub async fn create_request(&self, body: &NewRequest) -> Result<String, ServerError> {
        let url = self.server.url("api/v1.0/requests")?;
        let (status, text) = self
            .server
            .send_once(self.server.http.request(Method::POST, url).json(body))
            .await?;
        serde_json::from_str::<String>(&text).map_err(|e| ServerError::BadBody {
            status: status.as_u16(),
            detail: format!("expected a JSON string: {e}"),
        })
    }

    /// A GET whose answer may be 204 (nothing), one object, or an array of them.
    async fn get_list<T: DeserializeOwned>(
        &self,
        path: &str,
        query: &[(&str, &str)],
    ) -> Result<Vec<T>, ServerError> {
        let mut attempt = 0;
        loop {
            match self.get_once(path, query).await {
                // An authentication failure is not retried at once: the keytab or the secret
                // will not have changed a few hundred milliseconds later.
                Err(e)
                    if e.is_transient()
                        && !matches!(e, ServerError::Auth(_))
                        && attempt < self.server.retries =>
                {
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
    ) -> Result<Vec<T>, ServerError> {
        let mut url = self.server.url(path)?;
        if !query.is_empty() {
            url.query_pairs_mut().extend_pairs(query);
        }
        let response = self.server.execute(self.server.http.get(url)).await?;
        let status = response.status();
        let bytes = read_body(response).await?;
        // hyper hands an HTTP/1 connection back to the pool from a task of its own once the body
        // is read. Yielding lets that task run before the next request of this lookup looks for
        // an idle connection; otherwise, on a fast network, opening a new one can win the race.
        tokio::task::yield_now().await;
        decode_list(status, &bytes)
    }
}

/// Decodes a MIM CM list answer: 204 or an empty body is no item, `null` too, one object is a
/// list of one (the API answers a lookup that way), an array is the list. Every item must decode
/// as `T`. A server is untrusted input: this never panics on its bytes.
pub fn decode_list<T: DeserializeOwned>(
    status: StatusCode,
    bytes: &[u8],
) -> Result<Vec<T>, ServerError> {
    if status == StatusCode::NO_CONTENT
        || (status.is_success() && bytes.iter().all(u8::is_ascii_whitespace))
    {
        return Ok(Vec::new());
    }
    if !status.is_success() {
        return Err(status_error(status, &String::from_utf8_lossy(bytes)));
    }
    let value: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|e| ServerError::BadBody {
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
        .map_err(|e| ServerError::BadBody {
            status: status.as_u16(),
            detail: e.to_string(),
        })
}
