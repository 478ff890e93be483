//! HTTP Negotiate (RFC 4559) with Kerberos through SPNEGO, on the system's MIT GSSAPI
//! (`libgssapi`).
//!
//! This module holds the GSSAPI side and the header syntax; `http` runs the HTTP
//! exchange (401, token, answer). The rules it keeps:
//!
//! - **No credential handle outlives a handshake.** MIT krb5 renews tickets from the client
//!   keytab only when credentials are acquired, so each handshake starts from the default
//!   credentials (or acquires the configured principal's afresh) and drops them at its end. A
//!   ticket that expires is then replaced on the next handshake, without a restart.
//! - **The process environment is set once, before any thread starts** ([`prepare_process`]):
//!   `KRB5_CLIENT_KTNAME` names the configured keytab and `KRB5CCNAME` a credential cache of
//!   cardbridge's own (under the state directory for the daemon, in memory for one-shot
//!   commands), so root's cache is never read or written. GSSAPI reads both from the
//!   environment; `libgssapi` has no per-call credential store, hence one keytab per station.
//! - **Every GSSAPI call blocks** (the first one may talk to the KDC): callers run them on
//!   tokio's blocking pool.
//! - **Mutual authentication is required**: the server's last token must complete the context
//!   with the mutual flag, or the answer is not trusted.

use std::path::Path;
use std::time::Duration;

use base64::Engine as _;
use libgssapi::context::{ClientCtx, CtxFlags, SecurityContext};
use libgssapi::credential::{Cred, CredUsage};
use libgssapi::name::Name;
use libgssapi::oid::{GSS_MECH_SPNEGO, GSS_NT_HOSTBASED_SERVICE, GSS_NT_KRB5_PRINCIPAL};

use super::secret::SecretPath;
use super::AuthError;
use crate::config::{Config, ServerAuth};

/// Where the process keeps its Kerberos tickets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CredentialCache<'a> {
    /// `FILE:<state_dir>/krb5cc`: the daemon's own, kept across handshakes and restarts.
    StateDir(&'a Path),
    /// `MEMORY:`: a one-shot command (`check-config --online`, `scan --reconcile`), which
    /// proves the keytab works without leaving a cache behind.
    Memory,
}

/// Sets `KRB5_CLIENT_KTNAME` (the configured keytab) and `KRB5CCNAME` (unless the environment
/// already names a cache, e.g. one kept by k5start) when a server uses `auth = "negotiate"`.
///
/// Call it from `main`, before any thread is started: the environment is process-wide.
pub fn prepare_process(config: &Config, cache: CredentialCache<'_>) -> Result<(), AuthError> {
    let sections = [&config.cm, &config.scepman];
    let negotiate: Vec<_> = sections
        .into_iter()
        .flatten()
        .filter(|s| s.auth == ServerAuth::Negotiate)
        .collect();
    if negotiate.is_empty() {
        return Ok(());
    }
    if let Some(keytab) = negotiate.iter().find_map(|s| s.keytab.as_ref()) {
        let keytab = SecretPath::resolve("keytab", keytab)?;
        std::env::set_var(
            "KRB5_CLIENT_KTNAME",
            format!("FILE:{}", keytab.path().display()),
        );
    }
    if std::env::var_os("KRB5CCNAME").is_none() {
        let name = match cache {
            CredentialCache::StateDir(dir) => format!("FILE:{}", dir.join("krb5cc").display()),
            CredentialCache::Memory => "MEMORY:cardbridge".to_string(),
        };
        std::env::set_var("KRB5CCNAME", name);
    }
    Ok(())
}

/// The Kerberos side of one `[cm]` or `[scepman]` section.
#[derive(Debug, Clone)]
pub struct Negotiator {
    /// `HTTP/cm.contoso.com`, as administrators write it (messages).
    spn: String,
    principal: Option<String>,
    keytab: Option<SecretPath>,
}

/// What a completed handshake proved, for `check-config --online`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Proof {
    pub principal: String,
    pub spn: String,
    /// How long the service ticket is still valid.
    pub lifetime: Duration,
}

/// A handshake under way: the GSSAPI context between the token sent and the server's answer.
pub struct Handshake {
    ctx: ClientCtx,
}

impl Negotiator {
    /// `spn`: configured, else `HTTP/<host of base_url>`.
    pub fn new(
        host: &str,
        spn: Option<&str>,
        principal: Option<&str>,
        keytab: Option<SecretPath>,
    ) -> Negotiator {
        Negotiator {
            spn: spn.map_or_else(|| format!("HTTP/{host}"), str::to_string),
            principal: principal.map(str::to_string),
            keytab,
        }
    }

    pub fn spn(&self) -> &str {
        &self.spn
    }

    /// The first leg: a new context and the token for `Authorization: Negotiate`.
    /// Blocking: it may ask the KDC for a ticket.
    pub fn start(&self) -> Result<(Handshake, Vec<u8>), AuthError> {
        self.check_keytab()?;
        let cred = match &self.principal {
            None => None,
            Some(principal) => {
                let name = Name::new(principal.as_bytes(), Some(GSS_NT_KRB5_PRINCIPAL))
                    .map_err(|e| self.classify(e.to_string()))?;
                let cred = Cred::acquire(Some(&name), None, CredUsage::Initiate, None)
                    .map_err(|e| self.classify(e.to_string()))?;
                Some(cred)
            }
        };
        let mut ctx = ClientCtx::new(
            cred,
            self.target()?,
            CtxFlags::GSS_C_MUTUAL_FLAG | CtxFlags::GSS_C_SEQUENCE_FLAG,
            Some(GSS_MECH_SPNEGO),
        );
        let token = ctx
            .step(None, None)
            .map_err(|e| self.classify(e.to_string()))?
            .ok_or_else(|| AuthError::Kerberos {
                spn: self.spn.clone(),
                detail: "GSSAPI produced no initial token".into(),
            })?;
        Ok((Handshake { ctx }, token.to_vec()))
    }

    /// Feeds the server's token. Returns the next token to send while the context needs one
    /// more leg, or `None` once it is complete. Blocking.
    pub fn step(
        &self,
        handshake: &mut Handshake,
        token: &[u8],
    ) -> Result<Option<Vec<u8>>, AuthError> {
        let mutual = |detail: String| AuthError::MutualAuth {
            spn: self.spn.clone(),
            detail,
        };
        let next = handshake
            .ctx
            .step(Some(token), None)
            .map_err(|e| mutual(e.to_string()))?;
        if handshake.ctx.is_complete() {
            return Ok(None);
        }
        Ok(next.map(|t| t.to_vec()))
    }

    /// Whether the server proved its identity: the context is complete with the mutual flag.
    pub fn verify(&self, handshake: &Handshake) -> Result<Proof, AuthError> {
        let mutual = |detail: &str| AuthError::MutualAuth {
            spn: self.spn.clone(),
            detail: detail.to_string(),
        };
        if !handshake.ctx.is_complete() {
            return Err(mutual(
                "the server answered without the token that proves its identity",
            ));
        }
        let flags = handshake.ctx.flags().map_err(|e| mutual(&e.to_string()))?;
        if !flags.contains(CtxFlags::GSS_C_MUTUAL_FLAG) {
            return Err(mutual(
                "the context completed without mutual authentication",
            ));
        }
        let principal = handshake
            .ctx
            .source_name()
            .map(|n| n.to_string())
            .unwrap_or_default();
        let lifetime = handshake.ctx.lifetime().unwrap_or_default();
        Ok(Proof {
            principal,
            spn: self.spn.clone(),
            lifetime,
        })
    }

    fn target(&self) -> Result<Name, AuthError> {
        // `HTTP/host` is a host-based service name (the realm comes from krb5.conf's
        // domain_realm); `HTTP/host@REALM` names the principal exactly.
        let name = match self.spn.split_once('/') {
            Some((service, host)) if !self.spn.contains('@') => Name::new(
                format!("{service}@{host}").as_bytes(),
                Some(GSS_NT_HOSTBASED_SERVICE),
            ),
            _ => Name::new(self.spn.as_bytes(), Some(GSS_NT_KRB5_PRINCIPAL)),
        };
        name.map_err(|e| self.classify(e.to_string()))
    }

    /// A keytab that cannot be opened is named before GSSAPI turns it into "no credentials".
    fn check_keytab(&self) -> Result<(), AuthError> {
        let Some(keytab) = &self.keytab else {
            return Ok(());
        };
        keytab.check_mode()?;
        std::fs::File::open(keytab.path())
            .map(drop)
            .map_err(|e| AuthError::Keytab {
                path: keytab.path().display().to_string(),
                detail: e.to_string(),
            })
    }

    fn keytab_name(&self) -> String {
        match &self.keytab {
            Some(k) => k.path().display().to_string(),
            None => std::env::var("KRB5_CLIENT_KTNAME")
                .unwrap_or_else(|_| "the default client keytab".into()),
        }
    }

    /// Names the cause from MIT's message (its `Display` text; the `Debug` form misrenders
    /// routine errors), keeping the message itself as the detail.
    fn classify(&self, detail: String) -> AuthError {
        let lower = detail.to_ascii_lowercase();
        let has = |needles: &[&str]| needles.iter().any(|n| lower.contains(n));
        let spn = self.spn.clone();
        if has(&[
            "cannot contact any kdc",
            "cannot find kdc",
            "cannot resolve network address for kdc",
        ]) {
            AuthError::KdcUnreachable { detail }
        } else if has(&["clock skew"]) {
            AuthError::ClockSkew { detail }
        } else if has(&["server not found in kerberos database"]) {
            AuthError::UnknownSpn { spn, detail }
        } else if has(&[
            "preauthentication failed",
            "integrity check failed",
            "key version number",
            "no key table entry",
            "no suitable keys",
            "password incorrect",
            "client not found in kerberos database",
        ]) {
            AuthError::StaleKeytab {
                keytab: self.keytab_name(),
                principal: self
                    .principal
                    .clone()
                    .unwrap_or_else(|| "the keytab's principal".into()),
                detail,
            }
        } else if has(&[
            "no credentials",
            "no kerberos credentials",
            "credentials cache",
            "no such file",
        ]) {
            AuthError::NoCredentials { detail }
        } else {
            AuthError::Kerberos { spn, detail }
        }
    }
}

/// What a server's `WWW-Authenticate` headers offer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Challenges {
    /// `Negotiate`, with the decoded token when one came (`Some(None)`: bare `Negotiate`).
    pub negotiate: Option<Option<Vec<u8>>>,
    pub ntlm: bool,
}

/// Reads the challenges of every `WWW-Authenticate` value; one value may list several
/// (`Negotiate, NTLM`). A token that is not base64 is kept as its raw bytes, which GSSAPI then
/// refuses: a garbled answer is an error, never a success.
pub fn challenges<'a>(values: impl IntoIterator<Item = &'a str>) -> Challenges {
    let mut found = Challenges::default();
    for part in values.into_iter().flat_map(|v| v.split(',')) {
        let part = part.trim();
        let (scheme, data) = part.split_once(' ').unwrap_or((part, ""));
        if scheme.eq_ignore_ascii_case("negotiate") {
            let data = data.trim();
            let token = (!data.is_empty()).then(|| {
                base64::engine::general_purpose::STANDARD
                    .decode(data)
                    .unwrap_or_else(|_| data.as_bytes().to_vec())
            });
            found.negotiate = Some(token);
        } else if scheme.eq_ignore_ascii_case("ntlm") {
            found.ntlm = true;
        }
    }
    found
}

/// The `Authorization` value for a token.
pub fn authorization(token: &[u8]) -> String {
    format!(
        "Negotiate {}",
        base64::engine::general_purpose::STANDARD.encode(token)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_every_offer_of_every_header() {
        let c = challenges(["Negotiate, NTLM"]);
        assert_eq!(c.negotiate, Some(None));
        assert!(c.ntlm);
        let c = challenges(["NTLM"]);
        assert_eq!(c.negotiate, None);
        assert!(c.ntlm);
        let c = challenges([
            "Bearer realm=\"x\", error=\"invalid_token\"",
            "negotiate oYG3AA==",
        ]);
        assert_eq!(c.negotiate, Some(Some(vec![0xa1, 0x81, 0xb7, 0x00])));
        assert!(!c.ntlm);
        let c = challenges(["Negotiate !!not base64!!"]);
        assert_eq!(c.negotiate, Some(Some(b"!!not base64!!".to_vec())));
        assert_eq!(challenges(std::iter::empty()), Challenges::default());
    }

    #[test]
    fn names_the_cause_from_mits_messages() {
        let n = Negotiator::new("cm.contoso.com", None, Some("STATION01$@CONTOSO.COM"), None);
        assert_eq!(n.spn(), "HTTP/cm.contoso.com");
        let cause = |m: &str| n.classify(m.to_string()).cause();
        assert_eq!(cause("Unspecified GSS failure.  Minor code may provide more information (Cannot contact any KDC for realm 'CONTOSO.COM')"), "kdc_unreachable");
        assert_eq!(cause("Clock skew too great"), "clock_skew");
        assert_eq!(
            cause("Server not found in Kerberos database"),
            "unknown_spn"
        );
        assert_eq!(cause("Preauthentication failed"), "stale_keytab");
        assert_eq!(
            cause("No Kerberos credentials available (default cache: MEMORY:x)"),
            "no_credentials"
        );
        assert_eq!(cause("something new"), "kerberos");
        let e = n.classify("Preauthentication failed".into());
        assert!(e.to_string().contains("STATION01$@CONTOSO.COM"), "{e}");
    }

    #[test]
    fn an_spn_with_a_realm_is_kept_as_written() {
        let n = Negotiator::new("cm", Some("HTTP/cm.contoso.com@CONTOSO.COM"), None, None);
        assert_eq!(n.spn(), "HTTP/cm.contoso.com@CONTOSO.COM");
        assert!(authorization(&[1, 2, 3]).starts_with("Negotiate AQID"));
    }
}
