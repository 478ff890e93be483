//! The SCEPman Management API client (Enterprise Edition 3.1+): searching certificates, finding
//! one by its serial number, and revoking one by its serial number. Revocations are never retried here; the outbox decides (a
//! repeated PATCH is harmless, SCEPman answers 409 with error code 5013 for an already revoked
//! certificate).

use reqwest::{Method, StatusCode};
use serde::Deserialize;
use serde_json::json;

use crate::config::ServerConfig;
use crate::http::{read_body, status_error, Server, ServerError};
use crate::serial::Serial;

/// One page of `GET api/manage/search`. Items stay loose JSON until [`SearchItem`] reads them,
/// so one odd item does not lose the page.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SearchPage {
    #[serde(default)]
    pub items: Vec<serde_json::Value>,
    pub continuation_token: Option<String>,
}

impl SearchPage {
    /// The item whose serial number is `serial` as an integer (with or without a sign byte,
    /// any case); items that do not read as a [`SearchItem`] are passed over.
    pub fn find_serial(&self, serial: &Serial) -> Option<SearchItem> {
        self.items
            .iter()
            .filter_map(|item| SearchItem::deserialize(item).ok())
            .find(|item| serial.matches(&item.serial_number))
    }
}

/// Decodes an answer of `GET api/manage/search`: a non-success status becomes its
/// [`ServerError::Status`], anything but a search page a `bad_body`. A server is untrusted
/// input: this never panics on its bytes.
pub fn decode_search_page(status: StatusCode, body: &[u8]) -> Result<SearchPage, ServerError> {
    if !status.is_success() {
        return Err(status_error(status, &String::from_utf8_lossy(body)));
    }
    serde_json::from_slice(body).map_err(|e| ServerError::BadBody {
        status: status.as_u16(),
        detail: format!("not a search page ({e})"),
    })
}

/// The fields of a search item that say whether a certificate is still good.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SearchItem {
    pub serial_number: String,
    #[serde(default)]
    pub expiration_date: Option<String>,
    #[serde(default)]
    pub revocation_date: Option<String>,
    /// SCEPman documents only `null` here; a number (RFC 5280 reason) and a name are both
    /// accepted.
    #[serde(default)]
    pub revocation_reason: Option<serde_json::Value>,
    #[serde(default)]
    pub revoked_by: Option<String>,
}

/// How many result pages a serial-number lookup follows before giving up. The search matches
/// substrings of serials, subjects and requesters, so a short serial can have many neighbours;
/// 10 pages of 100 is far beyond what a real serial (16 to 20 bytes) finds.
pub const MAX_SEARCH_PAGES: usize = 10;
const SERIAL_PAGE_SIZE: u32 = 100;

/// What to ask `api/manage/search` for.
#[derive(Debug, Clone, Copy, Default)]
pub struct SearchQuery<'a> {
    pub text: Option<&'a str>,
    pub page_size: u32,
    /// `Any`, `Active`, `Expired` or `Revoked`; the server's default is `Any`.
    pub validity: Option<&'a str>,
    /// The previous page's token; SCEPman's own client sends only this (and the page size) for
    /// the next page, so the query travels inside the token.
    pub continuation: Option<&'a str>,
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

    /// `GET api/manage/search`: one page of certificates.
    pub async fn search(&self, query: &SearchQuery<'_>) -> Result<SearchPage, ServerError> {
        let mut url = self.server.url("api/manage/search")?;
        {
            let mut pairs = url.query_pairs_mut();
            pairs.append_pair("pageSize", &query.page_size.to_string());
            if let Some(token) = query.continuation {
                pairs.append_pair("continuationToken", token);
            } else {
                if let Some(text) = query.text {
                    pairs.append_pair("searchText", text);
                }
                if let Some(validity) = query.validity {
                    pairs.append_pair("certValidity", validity);
                }
            }
        }
        let response = self.server.execute(self.server.http.get(url)).await?;
        let status = response.status();
        let body = read_body(response).await?;
        decode_search_page(status, &body)
    }

    /// The certificate with this serial number, or `None` when SCEPman does not list it. The
    /// search text is the canonical hex (no sign byte), which the search finds inside a listed
    /// serial with or without one; the search matches substrings, so every item is compared
    /// whole, as an integer, and the pages are followed up to [`MAX_SEARCH_PAGES`] (more than
    /// that is a `bad_body`).
    pub async fn find_serial(&self, serial: &Serial) -> Result<Option<SearchItem>, ServerError> {
        let mut token: Option<String> = None;
        for _ in 0..MAX_SEARCH_PAGES {
            let page = self
                .search(&SearchQuery {
                    text: Some(serial.as_str()),
                    page_size: SERIAL_PAGE_SIZE,
                    validity: Some("Any"),
                    continuation: token.as_deref(),
                })
                .await?;
            let found = page.find_serial(serial);
            if found.is_some() {
                return Ok(found);
            }
            match page.continuation_token.filter(|t| !t.is_empty()) {
                Some(next) => token = Some(next),
                None => return Ok(None),
            }
        }
        Err(ServerError::BadBody {
            status: 200,
            detail: format!(
                "the search for serial {serial} went on for more than {MAX_SEARCH_PAGES} pages"
            ),
        })
    }

    /// The path of a revocation, also used to name the call in the audit trail: the canonical
    /// hex, the form cardbridge also searches with.
    pub fn revoke_path(serial: &Serial) -> String {
        format!("api/manage/revoke/{serial}")
    }

    /// `PATCH api/manage/revoke/{serial}` with the RFC 5280 reason number and the revoker.
    /// Ok means 2xx with no body (or JSON); a 2xx with anything else is a
    /// [`ServerError::BadBody`], every other answer a [`ServerError::Status`] carrying SCEPman's
    /// `errorCode`.
    pub async fn revoke(
        &self,
        serial: &Serial,
        reason_code: i64,
        revoker: Option<&str>,
    ) -> Result<u16, ServerError> {
        let url = self.server.url(&Self::revoke_path(serial))?;
        let mut body = json!({ "revocationReason": reason_code });
        if let Some(revoker) = revoker {
            body["revoker"] = json!(revoker);
        }
        let (status, answer) = self
            .server
            .send_once(self.server.http.request(Method::PATCH, url).json(&body))
            .await?;
        // SCEPman answers a revocation 200 with no body. A success status with a page that is not
        // JSON (a proxy's or a login page) is no proof the certificate was revoked.
        if !answer.trim().is_empty() && serde_json::from_str::<serde_json::Value>(&answer).is_err()
        {
            return Err(ServerError::BadBody {
                status: status.as_u16(),
                detail: "a success status with a body that is not SCEPman's (it answers a revocation with no body)".into(),
            });
        }
        Ok(status.as_u16())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(serials: &[&str]) -> SearchPage {
        let items = serials
            .iter()
            .map(|s| json!({"serialNumber": s, "revocationDate": null}))
            .collect();
        SearchPage {
            items,
            continuation_token: None,
        }
    }

    #[test]
    fn a_serial_is_found_by_its_integer_whatever_form_the_page_lists() {
        let with_sign_byte = Serial::parse("00D5D4A1").unwrap();
        let without = Serial::parse("D5D4A1").unwrap();
        for listed in ["00D5D4A1", "D5D4A1", "d5d4a1"] {
            let p = page(&["0D5D4A10", listed]);
            for wanted in [&with_sign_byte, &without] {
                let found = p.find_serial(wanted).map(|i| i.serial_number);
                assert_eq!(found.as_deref(), Some(listed), "{wanted} in {listed}");
            }
        }
        assert_eq!(page(&["D5D4A100"]).find_serial(&without), None);
    }
}
