//! `cardbridge check-config --online`: for every configured server, authenticate and make one
//! read-only call, then say what that proved (the Kerberos principal, SPN and ticket end; the
//! OAuth token's audience, roles and expiry) or why it failed and what to fix.
//!
//! The first thing to run after installing a station: a keytab, a secret or an SPN that is
//! wrong shows here, with its cause, instead of as `server_unavailable` on the first card.

use std::io::Write;
use std::time::Duration;

use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use crate::auth::oauth::peek_claims;
use crate::cm::CmClient;
use crate::config::Config;
use crate::http::{Server, ServerError};
use crate::scepman::{ScepmanClient, SearchQuery};

/// An all-zero card id: no card has it, so MIM CM answers `204` once authentication passed.
const NO_CARD: &str = "00000000-0000-0000-0000-000000000000";

/// Checks every configured server; returns whether all of them answered.
pub async fn online(config: &Config, out: &mut dyn Write) -> std::io::Result<bool> {
    let mut all_ok = true;
    if config.cm.is_none() && config.scepman.is_none() {
        writeln!(
            out,
            "no server is configured ([cm] and [scepman] are absent)"
        )?;
    }
    if let Some(cm) = &config.cm {
        writeln!(out, "cm: {} (auth {})", cm.base_url, cm.auth.as_str())?;
        let result = match CmClient::new(cm) {
            Ok(client) => client
                .find_smartcards(NO_CARD)
                .await
                .map(|found| {
                    format!(
                        "GET api/v1.0/smartcards?cardid={NO_CARD} answered ({} record{})",
                        found.len(),
                        if found.len() == 1 { "" } else { "s" }
                    )
                })
                .map(|call| (call, client)),
            Err(e) => Err(e),
        };
        all_ok &= report(out, result).await?;
    }
    if let Some(scepman) = &config.scepman {
        writeln!(
            out,
            "scepman: {} (auth {})",
            scepman.base_url,
            scepman.auth.as_str()
        )?;
        let result = match ScepmanClient::new(scepman) {
            Ok(client) => client
                .search(&SearchQuery {
                    page_size: 1,
                    ..SearchQuery::default()
                })
                .await
                .map(|_| {
                    (
                        "GET api/manage/search?pageSize=1 answered".to_string(),
                        client,
                    )
                }),
            Err(e) => Err(e),
        };
        all_ok &= report(out, result).await?;
    }
    Ok(all_ok)
}

/// The clients of both servers, so [`report`] can read what their authentication proved.
trait Proved {
    fn server(&self) -> &Server;
}

impl Proved for CmClient {
    fn server(&self) -> &Server {
        CmClient::server(self)
    }
}

impl Proved for ScepmanClient {
    fn server(&self) -> &Server {
        ScepmanClient::server(self)
    }
}

async fn report(
    out: &mut dyn Write,
    result: Result<(String, impl Proved), ServerError>,
) -> std::io::Result<bool> {
    let (call, client) = match result {
        Ok(answered) => answered,
        Err(e) => {
            writeln!(out, "  failed: {}: {e}", e.code())?;
            if let ServerError::Auth(auth) = &e {
                writeln!(out, "  to fix: {}", auth.fix())?;
            }
            return Ok(false);
        }
    };
    writeln!(out, "  ok: {call}")?;
    let server = client.server();
    if let Some(proof) = server.kerberos_proof() {
        writeln!(
            out,
            "  kerberos: principal {}, SPN {}, ticket valid until {}",
            proof.principal,
            proof.spn,
            after(proof.lifetime)
        )?;
    }
    if let Some(token) = match server.token_source() {
        Some(tokens) => tokens.current().await,
        None => None,
    } {
        match peek_claims(&token.value) {
            Some(claims) => writeln!(
                out,
                "  oauth: token for {}, roles [{}], expires {} (read from the token, not verified)",
                claims.aud.join(", "),
                claims.roles.join(", "),
                claims
                    .exp
                    .and_then(|exp| OffsetDateTime::from_unix_timestamp(exp).ok())
                    .and_then(|t| t.format(&Rfc3339).ok())
                    .unwrap_or_else(|| "?".into())
            )?,
            None => writeln!(
                out,
                "  oauth: an opaque token (not a JWT), accepted by the server"
            )?,
        }
    }
    Ok(true)
}

fn after(lifetime: Duration) -> String {
    (OffsetDateTime::now_utc() + lifetime)
        .replace_nanosecond(0)
        .ok()
        .and_then(|t| t.format(&Rfc3339).ok())
        .unwrap_or_else(|| "?".into())
}
