//! The SCEPman Management API client (Enterprise Edition 3.1+): searching certificates and
//! revoking one by its serial number. Revocations are never retried here; the outbox decides (a
//! repeated PATCH is harmless, SCEPman answers 409 with error code 5013 for an already revoked
//! certificate).

use reqwest::Method;
use serde::Deserialize;
use serde_json::json;

use crate::config::ServerConfig;
use crate::http::{read_body, status_error, Server, ServerError};

/// One page of `GET api/manage/search`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SearchPage {
    #[serde(default)]
    pub items: Vec<serde_json::Value>,
    pub continuation_token: Option<String>,
}

/// SCEPman's `errorCode` for a certificate that is already revoked (with 409).
pub const ALREADY_REVOKED: i64 = 5013;
/// SCEPman's `errorCode` for an unknown serial number (with 404).
pub const NOT_FOUND: i64 = 7012;

#[derive(Clone)]
pub struct ScepmanClient {
    server: Server,
}

impl ScepmanClient {
    pub fn new(config: &ServerConfig) -> Result<ScepmanClient, ServerError> {
        Ok(ScepmanClient {
            server: Server::new(config, "scepman")?,
        })
    }

    /// The HTTP layer of this client (authentication details for `check-config --online`).
    pub fn server(&self) -> &Server {
        &self.server
    }

    /// `GET api/manage/search?pageSize=N[&searchText=…]`: one page of certificates.
    pub async fn search(
        &self,
        search_text: Option<&str>,
        page_size: u32,
    ) -> Result<SearchPage, ServerError> {
        let mut url = self.server.url("api/manage/search")?;
        url.query_pairs_mut()
            .append_pair("pageSize", &page_size.to_string());
        if let Some(text) = search_text {
            url.query_pairs_mut().append_pair("searchText", text);
        }
        let response = self.server.execute(self.server.http.get(url)).await?;
        let status = response.status();
        let body = read_body(response).await?;
        if !status.is_success() {
            return Err(status_error(status, &String::from_utf8_lossy(&body)));
        }
        serde_json::from_slice(&body).map_err(|e| ServerError::BadBody {
            status: status.as_u16(),
            detail: format!("not a search page ({e})"),
        })
    }

    /// The path of a revocation, also used to name the call in the audit trail.
    pub fn revoke_path(serial_number: &str) -> String {
        format!("api/manage/revoke/{serial_number}")
    }

    /// `PATCH api/manage/revoke/{serial}` with the RFC 5280 reason number and the revoker.
    /// Ok means 2xx; every other answer is a [`ServerError::Status`] carrying SCEPman's
    /// `errorCode`.
    pub async fn revoke(
        &self,
        serial_number: &str,
        reason_code: i64,
        revoker: Option<&str>,
    ) -> Result<u16, ServerError> {
        let url = self.server.url(&Self::revoke_path(serial_number))?;
        let mut body = json!({ "revocationReason": reason_code });
        if let Some(revoker) = revoker {
            body["revoker"] = json!(revoker);
        }
        let (status, _) = self
            .server
            .send_once(self.server.http.request(Method::PATCH, url).json(&body))
            .await?;
        Ok(status.as_u16())
    }
}
