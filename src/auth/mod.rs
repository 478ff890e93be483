//! How cardbridge proves who it is to MIM CM and SCEPman.
//!
//! - [`negotiate`]: HTTP Negotiate (SPNEGO / Kerberos) from the station's keytab, on the
//!   system's MIT GSSAPI, which is what a real MIM CM (Windows Integrated Authentication) asks
//!   for.
//! - [`oauth`]: OAuth 2.0 client credentials (Entra ID v2 or AD FS), with a client secret or a
//!   signed client assertion, which is what the SCEPman Management API asks for.
//! - [`secret`]: reading the files that hold secrets.
//!
//! Every failure to authenticate is one [`AuthError`], reported as the `auth_failed` class: its
//! message names the cause and its [`AuthError::fix`] what an administrator should do. No
//! message carries a secret or a token.

pub mod kdc;
pub mod keytab;
pub mod negotiate;
pub mod oauth;
pub mod secret;

use thiserror::Error;

pub use secret::SecretError;

/// Why authentication failed, each cause with the facts needed to fix it.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum AuthError {
    #[error("the keytab {path} is missing or unreadable: {detail}")]
    Keytab { path: String, detail: String },
    #[error("the keytab {path} cannot be read as a keytab: {detail}")]
    BadKeytab { path: String, detail: String },
    #[error("the keytab {path} holds no keys")]
    EmptyKeytab { path: String },
    #[error("the keytab {keytab} holds no key for {principal}{}; it holds {holds}", case_only.as_ref().map(|p| format!(" (it holds {p}, which differs only in case: Kerberos names are case-sensitive)")).unwrap_or_default())]
    KeytabLacksPrincipal {
        keytab: String,
        principal: String,
        holds: String,
        /// A principal of the keytab equal to the wanted one but for case.
        case_only: Option<String>,
    },
    #[error("the KDC does not know the client principal {principal}: {detail}")]
    UnknownPrincipal { principal: String, detail: String },
    #[error("no Kerberos credentials: no client keytab (configure keytab, or KRB5_CLIENT_KTNAME) and no ticket in the credential cache: {detail}")]
    NoCredentials { detail: String },
    #[error("the keytab {keytab} holds no valid key for {principal} (a stale key version, or another principal): {detail}")]
    StaleKeytab {
        keytab: String,
        principal: String,
        detail: String,
    },
    #[error("the KDC of realm {realm} ({kdcs}) cannot be reached: {detail}")]
    KdcUnreachable {
        realm: String,
        kdcs: String,
        detail: String,
    },
    #[error("the clocks of this station and the KDC differ too much: {detail}")]
    ClockSkew { detail: String },
    #[error("the KDC does not know the server principal {spn}: {detail}")]
    UnknownSpn { spn: String, detail: String },
    #[error("the server refused the Kerberos ticket for {spn}: {detail}")]
    TicketRefused { spn: String, detail: String },
    #[error("the server offers only NTLM, which cardbridge does not support; enable Kerberos (Negotiate) for the site and register the SPN {spn} for its application pool account")]
    NtlmOnly { spn: String },
    #[error("the server's answer failed mutual authentication for {spn}: {detail}")]
    MutualAuth { spn: String, detail: String },
    #[error("Kerberos failed for {spn}: {detail}")]
    Kerberos { spn: String, detail: String },
    #[error("the token endpoint refused the client{}: {error}: {description}", code.as_ref().map(|c| format!(" ({c})")).unwrap_or_default())]
    TokenEndpointRefused {
        status: u16,
        error: String,
        description: String,
        /// Entra ID's `AADSTS…` code, when it gives one.
        code: Option<String>,
    },
    #[error("the token endpoint cannot be used: {detail}")]
    TokenEndpoint { detail: String },
    #[error("the client assertion cannot be made: {detail}")]
    Assertion { detail: String },
    #[error("the server refused the access token: {detail}")]
    TokenRefused { detail: String },
    #[error("{0}")]
    Secret(#[from] SecretError),
}

impl AuthError {
    /// Stable name of the cause (logs, tests).
    pub fn cause(&self) -> &'static str {
        match self {
            AuthError::Keytab { .. } => "keytab",
            AuthError::BadKeytab { .. } => "bad_keytab",
            AuthError::EmptyKeytab { .. } => "empty_keytab",
            AuthError::KeytabLacksPrincipal { .. } => "keytab_lacks_principal",
            AuthError::UnknownPrincipal { .. } => "unknown_principal",
            AuthError::NoCredentials { .. } => "no_credentials",
            AuthError::StaleKeytab { .. } => "stale_keytab",
            AuthError::KdcUnreachable { .. } => "kdc_unreachable",
            AuthError::ClockSkew { .. } => "clock_skew",
            AuthError::UnknownSpn { .. } => "unknown_spn",
            AuthError::TicketRefused { .. } => "ticket_refused",
            AuthError::NtlmOnly { .. } => "ntlm_only",
            AuthError::MutualAuth { .. } => "mutual_auth",
            AuthError::Kerberos { .. } => "kerberos",
            AuthError::TokenEndpointRefused { .. } => "token_endpoint_refused",
            AuthError::TokenEndpoint { .. } => "token_endpoint",
            AuthError::Assertion { .. } => "assertion",
            AuthError::TokenRefused { .. } => "token_refused",
            AuthError::Secret(_) => "secret",
        }
    }

    /// What an administrator should do about it, in one sentence.
    pub fn fix(&self) -> String {
        match self {
            AuthError::Keytab { path, .. } => format!("copy the station keytab to {path}, owned by the service user with mode 0600 (klist -k {path} lists its principals)"),
            AuthError::BadKeytab { path, .. } => format!("export the station's keytab again (adcli join, msktutil, or ktpass) and copy it to {path} unchanged (binary, not base64 or text)"),
            AuthError::EmptyKeytab { path, .. } => format!("export the station account's keys into {path} (adcli join, msktutil --update, or ktpass); klist -k {path} must list them"),
            AuthError::KeytabLacksPrincipal { keytab, principal, case_only, .. } => match case_only {
                Some(held) => format!("set principal = \"{held}\" (as the keytab and the KDC write it), or export a keytab for {principal}"),
                None => format!("export a keytab for {principal} to {keytab}, or set principal to one the keytab holds (klist -k {keytab})"),
            },
            AuthError::UnknownPrincipal { principal, .. } => format!("create the account {principal} in the domain (or join the station again), or set principal to an account the KDC knows and export its keytab"),
            AuthError::NoCredentials { .. } => "set keytab in the server section to the station's client keytab".into(),
            AuthError::StaleKeytab { keytab, .. } => format!("the account's password changed since {keytab} was made: export it again (adcli update, msktutil --auto-update, or ktpass) and compare klist -k {keytab} with the KDC's key version"),
            AuthError::KdcUnreachable { realm, .. } => format!("check the KDCs of {realm} in /etc/krb5.conf (or its DNS SRV records) and the network path to their port 88; requests are retried"),
            AuthError::ClockSkew { .. } => "synchronise the station's clock with the domain controllers (chrony or systemd-timesyncd)".into(),
            AuthError::UnknownSpn { spn, .. } => format!("ask the MIM CM administrator to register {spn} on the account that runs the CM web site (setspn -S), or set spn in the configuration to the one registered"),
            AuthError::TicketRefused { spn, .. } => format!("the server could not accept a ticket for {spn}: check that its keytab or application pool account holds that SPN, and that the station's account may use the site"),
            AuthError::NtlmOnly { .. } => "enable Negotiate (Kerberos) in the site's Windows Authentication providers".into(),
            AuthError::MutualAuth { .. } => "the answer did not come from the server the ticket was for: check for a proxy or a wrong DNS entry in between".into(),
            AuthError::Kerberos { .. } => "run check-config --online and klist -k on the keytab; KRB5_TRACE=/dev/stderr shows every step".into(),
            AuthError::TokenEndpointRefused { .. } => "check client_id, the client secret or certificate registered on the app registration, and its Manage.All role; the AADSTS code names the problem".into(),
            AuthError::TokenEndpoint { .. } => "check token_url and the network path to the token endpoint".into(),
            AuthError::Assertion { .. } => "client_assertion_certificate and client_assertion_key must be the PEM certificate registered on the application and its RSA private key".into(),
            AuthError::TokenRefused { .. } => "the token was issued but the server refused it: check scope (or resource) and that the application has the role the server wants (SCEPman: Manage.All)".into(),
            AuthError::Secret(_) => "see the message for the file and what to change".into(),
        }
    }
}
