//! The SCEPman Management API client (Enterprise Edition 3.1+): revoking a certificate by its
//! serial number. Revocations are never retried here; the outbox decides (a repeated PATCH is
//! harmless, SCEPman answers 409 with error code 5013 for an already revoked certificate).

use reqwest::Method;
use serde_json::json;

use crate::config::ServerConfig;
use crate::http::{Server, ServerError};

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
