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
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use libgssapi::context::{ClientCtx, CtxFlags, SecurityContext};
use libgssapi::credential::{Cred, CredUsage};
use libgssapi::error::{Error as GssError, MajorFlags};
use libgssapi::name::Name;
use libgssapi::oid::{
    Oid, GSS_MECH_KRB5, GSS_MECH_SPNEGO, GSS_NT_HOSTBASED_SERVICE, GSS_NT_KRB5_PRINCIPAL,
};

use std::io::Read as _;

use super::secret::SecretPath;
use super::{kdc, keytab, AuthError};
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
    /// Held while a first leg runs: concurrent requests that each need a handshake would
    /// otherwise each ask the KDC for a ticket while the cache is empty or expired; one after
    /// the other, the first fills the cache and the rest use it.
    first_leg: Arc<Mutex<()>>,
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
            first_leg: Arc::default(),
        }
    }

    pub fn spn(&self) -> &str {
        &self.spn
    }

    /// The first leg: a new context and the token for `Authorization: Negotiate`.
    /// Blocking: it may ask the KDC for a ticket.
    pub fn start(&self) -> Result<(Handshake, Vec<u8>), AuthError> {
        let _one_at_a_time = self.first_leg.lock().unwrap_or_else(|p| p.into_inner());
        self.check_keytab()?;
        let mut ctx = self.context(GSS_MECH_SPNEGO)?;
        let token = ctx
            .step(None, None)
            .map_err(|e| self.diagnose(&e))?
            .ok_or_else(|| AuthError::Kerberos {
                spn: self.spn.clone(),
                detail: "GSSAPI produced no initial token".into(),
            })?;
        Ok((Handshake { ctx }, token.to_vec()))
    }

    /// A client context for `mech`, with the configured principal's credentials (else the
    /// default ones).
    fn context(&self, mech: Oid<'static>) -> Result<ClientCtx, AuthError> {
        let cred = match &self.principal {
            None => None,
            Some(principal) => {
                let name = Name::new(principal.as_bytes(), Some(GSS_NT_KRB5_PRINCIPAL))
                    .map_err(|e| self.classify(&e))?;
                let cred = Cred::acquire(Some(&name), None, CredUsage::Initiate, None)
                    .map_err(|e| self.classify(&e))?;
                Some(cred)
            }
        };
        Ok(ClientCtx::new(
            cred,
            self.target()?,
            CtxFlags::GSS_C_MUTUAL_FLAG | CtxFlags::GSS_C_SEQUENCE_FLAG,
            Some(mech),
        ))
    }

    /// Why the first SPNEGO leg failed. SPNEGO passes the Kerberos error on as a number of
    /// GSSAPI's own (its mechanism glue renumbers the codes of the mechanisms below it), so
    /// the same leg is tried once more with the Kerberos mechanism itself, which gives the
    /// krb5 error code; nothing is sent to the server either way.
    fn diagnose(&self, spnego: &GssError) -> AuthError {
        let krb5 = self
            .context(GSS_MECH_KRB5)
            .map(|mut ctx| ctx.step(None, None));
        match krb5 {
            Ok(Err(e)) => self.classify(&e),
            Err(named) => named,
            Ok(Ok(_)) => self.classify(spnego),
        }
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
        name.map_err(|e| self.classify(&e))
    }

    /// The keytab is read before GSSAPI sees it, because GSSAPI turns every keytab problem into
    /// "no credentials": a directory, a loose mode, a missing file, bytes that are not a
    /// keytab, a keytab without keys, and one without the configured principal (naming the
    /// principals it holds, and saying so when only the case differs) each get their own
    /// cause.
    fn check_keytab(&self) -> Result<(), AuthError> {
        let Some(keytab) = &self.keytab else {
            return Ok(());
        };
        let path = keytab.path().display().to_string();
        keytab.check_mode()?;
        let entries = self.keytab_entries(keytab)?;
        if entries.is_empty() {
            return Err(AuthError::EmptyKeytab { path });
        }
        let Some(wanted) = &self.principal else {
            return Ok(());
        };
        let held = keytab::principals(&entries);
        if held.iter().any(|p| principal_eq(p, wanted)) {
            return Ok(());
        }
        let case_only = held
            .iter()
            .find(|p| principal_eq_ignore_case(p, wanted))
            .cloned();
        Err(AuthError::KeytabLacksPrincipal {
            keytab: path,
            principal: wanted.clone(),
            holds: held.join(", "),
            case_only,
        })
    }

    fn keytab_entries(&self, keytab: &SecretPath) -> Result<Vec<keytab::Entry>, AuthError> {
        let path = keytab.path().display().to_string();
        let mut bytes = Vec::new();
        std::fs::File::open(keytab.path())
            .and_then(|f| {
                f.take(keytab::MAX_KEYTAB_SIZE as u64 + 1)
                    .read_to_end(&mut bytes)
            })
            .map_err(|e| AuthError::Keytab {
                path: path.clone(),
                detail: e.to_string(),
            })?;
        keytab::parse(&bytes).map_err(|e| AuthError::BadKeytab {
            path,
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

    /// The client principal a handshake uses: the configured one, else the keytab's first.
    fn client_principal(&self) -> String {
        if let Some(p) = &self.principal {
            return p.clone();
        }
        self.keytab
            .as_ref()
            .and_then(|k| self.keytab_entries(k).ok())
            .and_then(|entries| entries.first().map(|e| e.principal.clone()))
            .unwrap_or_else(|| "the keytab's principal".into())
    }

    /// Names the cause from the krb5 error code GSSAPI passes on as its minor status (MIT's
    /// English text varies: it puts the principal's name in the middle of its sentences), and
    /// keeps the message itself as the detail.
    fn classify(&self, e: &GssError) -> AuthError {
        let detail = e.to_string();
        let spn = self.spn.clone();
        // The minor status carries a krb5 `com_err` code, a negative 32-bit number.
        match Krb5Code::of(e.minor as i32) {
            Some(Krb5Code::KdcUnreachable) => self.kdc_unreachable(detail),
            Some(Krb5Code::ClockSkew) => AuthError::ClockSkew { detail },
            Some(Krb5Code::UnknownServer) => AuthError::UnknownSpn { spn, detail },
            Some(Krb5Code::UnknownClient) => AuthError::UnknownPrincipal {
                principal: self.client_principal(),
                detail,
            },
            Some(Krb5Code::WrongKey) => AuthError::StaleKeytab {
                keytab: self.keytab_name(),
                principal: self.client_principal(),
                detail,
            },
            // Expired tickets are renewed from the keytab at every handshake; when that did
            // not happen, the KDC is the usual reason: ask it.
            // (MIT's own text, "Ticket expired", would send an administrator to the keytab.)
            Some(Krb5Code::TicketExpired) if !kdc::answers(&self.realm()) => {
                self.kdc_unreachable("the tickets ended and no KDC answered to renew them".into())
            }
            Some(Krb5Code::NoCredentials) => AuthError::NoCredentials { detail },
            _ if e.major.contains(MajorFlags::GSS_S_NO_CRED) => AuthError::NoCredentials { detail },
            _ => AuthError::Kerberos { spn, detail },
        }
    }

    fn kdc_unreachable(&self, detail: String) -> AuthError {
        let realm = self.realm();
        let kdcs = kdc::addresses(&realm);
        AuthError::KdcUnreachable {
            realm,
            kdcs: if kdcs.is_empty() {
                "found through DNS".into()
            } else {
                kdcs.join(", ")
            },
            detail,
        }
    }

    /// The client's realm: the principal's, else krb5.conf's default.
    fn realm(&self) -> String {
        let principal = self.client_principal();
        match principal.rsplit_once('@') {
            Some((_, realm)) if !realm.is_empty() => realm.to_string(),
            _ => kdc::default_realm().unwrap_or_default(),
        }
    }
}

/// Principal names compare exactly, but a realm may be left out of the configuration (the
/// default realm is meant).
fn principal_eq(held: &str, wanted: &str) -> bool {
    held == wanted
        || (!wanted.contains('@') && held.split_once('@').is_some_and(|(n, _)| n == wanted))
}

fn principal_eq_ignore_case(held: &str, wanted: &str) -> bool {
    principal_eq(&held.to_ascii_lowercase(), &wanted.to_ascii_lowercase())
}

/// The krb5 error codes cardbridge tells apart (MIT `krb5.h`, `com_err` table `KRB5`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Krb5Code {
    KdcUnreachable,
    ClockSkew,
    UnknownServer,
    UnknownClient,
    WrongKey,
    TicketExpired,
    NoCredentials,
}

impl Krb5Code {
    fn of(code: i32) -> Option<Krb5Code> {
        Some(match code {
            // KRB5_KDC_UNREACH, KRB5_REALM_CANT_RESOLVE, KRB5_REALM_UNKNOWN
            -1765328228 | -1765328164 | -1765328230 => Krb5Code::KdcUnreachable,
            // KRB5KRB_AP_ERR_SKEW, KRB5_KDCREP_SKEW, KRB5KRB_AP_ERR_TKT_NYV
            -1765328347 | -1765328236 | -1765328351 => Krb5Code::ClockSkew,
            // KRB5KDC_ERR_S_PRINCIPAL_UNKNOWN
            -1765328377 => Krb5Code::UnknownServer,
            // KRB5KDC_ERR_C_PRINCIPAL_UNKNOWN
            -1765328378 => Krb5Code::UnknownClient,
            // KRB5KDC_ERR_PREAUTH_FAILED, KRB5KRB_AP_ERR_BAD_INTEGRITY, KRB5KRB_AP_ERR_MODIFIED,
            // KRB5KRB_AP_ERR_BADKEYVER, KRB5_KT_KVNONOTFOUND, KRB5_KT_NOTFOUND
            -1765328360 | -1765328353 | -1765328343 | -1765328340 | -1765328154 | -1765328203 => {
                Krb5Code::WrongKey
            }
            // KRB5KRB_AP_ERR_TKT_EXPIRED
            -1765328352 => Krb5Code::TicketExpired,
            // KRB5_CC_NOTFOUND, KRB5_FCC_NOFILE, KRB5_NO_TKT_SUPPLIED, KRB5_CC_END
            -1765328243 | -1765328189 | -1765328241 | -1765328242 => Krb5Code::NoCredentials,
            _ => return None,
        })
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
    fn names_the_cause_from_the_krb5_code_not_the_text() {
        let n = Negotiator::new("cm.contoso.com", None, Some("STATION01$@CONTOSO.COM"), None);
        assert_eq!(n.spn(), "HTTP/cm.contoso.com");
        let cause = |minor: i32| {
            let e = GssError {
                major: MajorFlags::GSS_S_FAILURE,
                minor: minor as u32,
            };
            n.classify(&e)
        };
        let table: [(i32, &str); 9] = [
            (-1765328228, "kdc_unreachable"),
            (-1765328347, "clock_skew"),
            (-1765328236, "clock_skew"),
            (-1765328377, "unknown_spn"),
            (-1765328378, "unknown_principal"),
            (-1765328360, "stale_keytab"),
            (-1765328154, "stale_keytab"),
            (-1765328243, "no_credentials"),
            (12345, "kerberos"),
        ];
        for (code, want) in table {
            assert_eq!(cause(code).cause(), want, "{code}");
        }
        let e = cause(-1765328378);
        assert!(
            e.to_string()
                .contains("client principal STATION01$@CONTOSO.COM"),
            "{e}"
        );
        assert!(
            e.fix()
                .contains("create the account STATION01$@CONTOSO.COM"),
            "{e}"
        );
    }

    #[test]
    fn a_principal_without_realm_matches_the_keytabs_with_one() {
        assert!(principal_eq("station03@CONTOSO.COM", "station03"));
        assert!(principal_eq(
            "station03@CONTOSO.COM",
            "station03@CONTOSO.COM"
        ));
        assert!(!principal_eq(
            "STATION03@CONTOSO.COM",
            "station03@CONTOSO.COM"
        ));
        assert!(principal_eq_ignore_case(
            "STATION03@CONTOSO.COM",
            "station03"
        ));
    }

    #[test]
    fn an_spn_with_a_realm_is_kept_as_written() {
        let n = Negotiator::new("cm", Some("HTTP/cm.contoso.com@CONTOSO.COM"), None, None);
        assert_eq!(n.spn(), "HTTP/cm.contoso.com@CONTOSO.COM");
        assert!(authorization(&[1, 2, 3]).starts_with("Negotiate AQID"));
    }
}
