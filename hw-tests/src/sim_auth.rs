//! How the simulated servers authenticate callers, as the real ones do.
//!
//! - **Negotiate** (MIM CM's Windows Integrated Authentication): `401` with
//!   `WWW-Authenticate: Negotiate` and `NTLM`, as IIS offers them; a SPNEGO token verified by a
//!   real GSSAPI acceptor with the service keytab in `KRB5_KTNAME`, answered with the server's
//!   mutual-authentication token. Either per request, or once per connection (IIS'
//!   `authPersistNonNTLM`). Faults: a garbage mutual token, or NTLM only.
//! - **OAuth** (SCEPman's Entra ID app, or AD FS): token endpoints of both shapes,
//!   `/<tenant>/oauth2/v2.0/token` (`scope`) and `/adfs/oauth2/token` (`resource`), that check a
//!   client secret or a client assertion (signature, `aud`, `iss`/`sub`, `exp`, `nbf`, a span of
//!   at most 10 minutes, a `jti` never seen before) and issue short-lived signed JWTs, which the
//!   API routes then require. Refusals carry Entra's `error`, `error_description` and AADSTS code.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::time::Duration;

use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use libgssapi::context::{SecurityContext, ServerCtx};
use libgssapi::credential::{Cred, CredUsage};
use serde_json::{json, Value};

/// How the simulated servers authenticate (set with `Simulator::set_auth`).
#[derive(Clone, Default)]
pub enum SimAuth {
    #[default]
    None,
    Negotiate(NegotiateStyle),
    OAuth(OAuthApp),
}

#[derive(Debug, Clone, Copy, Default)]
pub struct NegotiateStyle {
    /// Authenticate a connection once and let its later requests through.
    pub per_connection: bool,
    /// Answer with a mutual-authentication token that is not one.
    pub garbage_mutual_token: bool,
    /// Offer only NTLM.
    pub ntlm_only: bool,
    /// Set a session cookie with the mutual token, and let its bearer through unchallenged
    /// (the ASP.NET session a real site may keep).
    pub session_cookie: bool,
}

/// The session cookie's name.
pub const SESSION_COOKIE: &str = "CMSESSION";

/// The application registration the token endpoints know.
#[derive(Debug, Clone)]
pub struct OAuthApp {
    pub client_id: String,
    pub client_secret: Option<String>,
    /// PEM public key of the certificate registered for client assertions.
    pub assertion_public_key: Option<Vec<u8>>,
    pub token_lifetime: Duration,
    pub roles: Vec<String>,
}

/// What the authentication side has seen (tests read it).
#[derive(Debug, Clone, Default)]
pub struct AuthStats {
    /// Negotiate tokens accepted (each is one Kerberos AP exchange).
    pub kerberos_exchanges: u64,
    /// Token requests answered with a token.
    pub tokens_issued: u64,
    /// Token requests refused.
    pub token_refusals: u64,
    /// API calls refused for a missing, bad, expired or revoked credential.
    pub refused_calls: u64,
    /// Every access token issued, so tests can look for them where they must not be.
    pub issued: Vec<String>,
}

#[derive(Default)]
pub(crate) struct AuthState {
    pub(crate) mode: SimAuth,
    acceptor: Option<Cred>,
    authenticated: HashSet<SocketAddr>,
    sessions: HashSet<String>,
    seen_jti: HashSet<String>,
    /// Tokens issued before this time (seconds) are refused, as after a key rollover.
    not_before: u64,
    signing_key: Vec<u8>,
    pub(crate) stats: AuthStats,
}

impl AuthState {
    pub(crate) fn set(&mut self, mode: SimAuth) -> anyhow::Result<()> {
        self.acceptor = match mode {
            SimAuth::Negotiate(_) => Some(
                Cred::acquire(None, None, CredUsage::Accept, None)
                    .map_err(|e| anyhow::anyhow!("no acceptor credentials (KRB5_KTNAME): {e}"))?,
            ),
            _ => None,
        };
        if self.signing_key.is_empty() {
            self.signing_key = (0..32).map(|_| fastrand::u8(..)).collect();
        }
        self.authenticated.clear();
        self.mode = mode;
        Ok(())
    }

    /// Refuses every access token issued so far.
    pub(crate) fn revoke_tokens(&mut self) {
        self.not_before = now() + 1;
    }
}

/// What an authentication check decided.
pub(crate) enum Verdict {
    /// Serve the request; add these headers (the mutual-authentication token, a cookie).
    Pass(Vec<(header::HeaderName, HeaderValue)>),
    Refuse(Response),
}

/// The per-request check, before the route runs. `auth` locks the simulator's state, seen as
/// its authentication part. Negotiate's acceptor step runs outside the lock (it is cryptography
/// over a keytab).
pub(crate) fn check<G: std::ops::DerefMut<Target = AuthState>>(
    auth: impl Fn() -> G,
    client: SocketAddr,
    headers: &HeaderMap,
) -> Verdict {
    let (mode, acceptor, known) = {
        let s = auth();
        let session = headers
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .filter_map(|c| c.trim().strip_prefix(&format!("{SESSION_COOKIE}=")))
            .any(|id| s.sessions.contains(id));
        (
            s.mode.clone(),
            s.acceptor.clone(),
            s.authenticated.contains(&client) || session,
        )
    };
    let mut verdict = match mode {
        SimAuth::None => Verdict::Pass(Vec::new()),
        SimAuth::Negotiate(style) => negotiate(style, acceptor, known, headers),
        SimAuth::OAuth(_) => bearer(&auth(), headers),
    };
    let mut s = auth();
    match (&mut verdict, &mode) {
        (Verdict::Refuse(_), SimAuth::OAuth(_)) => s.stats.refused_calls += 1,
        (Verdict::Pass(added), SimAuth::Negotiate(style)) if !added.is_empty() => {
            s.stats.kerberos_exchanges += 1;
            if style.per_connection {
                s.authenticated.insert(client);
            }
            if style.session_cookie {
                let id = format!("{:032x}", fastrand::u128(..));
                if let Ok(v) =
                    HeaderValue::from_str(&format!("{SESSION_COOKIE}={id}; Path=/; HttpOnly"))
                {
                    added.push((header::SET_COOKIE, v));
                }
                s.sessions.insert(id);
            }
        }
        _ => {}
    }
    verdict
}

fn negotiate(
    style: NegotiateStyle,
    acceptor: Option<Cred>,
    known: bool,
    headers: &HeaderMap,
) -> Verdict {
    if style.ntlm_only {
        return Verdict::Refuse(challenge(&["NTLM"]));
    }
    if known {
        return Verdict::Pass(Vec::new());
    }
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Negotiate "))
        .and_then(|t| {
            base64::engine::general_purpose::STANDARD
                .decode(t.trim())
                .ok()
        });
    let Some(token) = token else {
        return Verdict::Refuse(challenge(&["Negotiate", "NTLM"]));
    };
    let mut ctx = ServerCtx::new(acceptor);
    match ctx.step(&token, None) {
        Ok(answer) if ctx.is_complete() => {
            let answer = match (style.garbage_mutual_token, answer) {
                (true, _) => b"not a mutual authentication token".to_vec(),
                (false, Some(answer)) => answer.to_vec(),
                (false, None) => Vec::new(),
            };
            let value = format!(
                "Negotiate {}",
                base64::engine::general_purpose::STANDARD.encode(answer)
            );
            Verdict::Pass(
                HeaderValue::from_str(&value)
                    .ok()
                    .map(|v| (header::WWW_AUTHENTICATE, v))
                    .into_iter()
                    .collect(),
            )
        }
        Ok(_) => Verdict::Refuse(challenge(&["Negotiate"])),
        Err(e) => {
            eprintln!("cm-sim: Negotiate refused: {e}");
            Verdict::Refuse(challenge(&["Negotiate", "NTLM"]))
        }
    }
}

fn challenge(schemes: &[&'static str]) -> Response {
    let mut response = (
        StatusCode::UNAUTHORIZED,
        axum::Json(json!({"Message": "Authorization has been denied for this request."})),
    )
        .into_response();
    for scheme in schemes {
        response
            .headers_mut()
            .append(header::WWW_AUTHENTICATE, HeaderValue::from_static(scheme));
    }
    response
}

fn bearer(state: &AuthState, headers: &HeaderMap) -> Verdict {
    let refuse = |error: &str| {
        let mut r = (
            StatusCode::UNAUTHORIZED,
            axum::Json(json!({"errorMessage": error})),
        )
            .into_response();
        if let Ok(v) = HeaderValue::from_str(&format!(
            "Bearer error=\"invalid_token\", error_description=\"{error}\""
        )) {
            r.headers_mut().insert(header::WWW_AUTHENTICATE, v);
        }
        Verdict::Refuse(r)
    };
    let Some(token) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
    else {
        return refuse("no bearer token");
    };
    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::HS256);
    validation.leeway = 0;
    validation.validate_aud = false;
    let key = jsonwebtoken::DecodingKey::from_secret(&state.signing_key);
    match jsonwebtoken::decode::<Value>(token.trim(), &key, &validation) {
        Ok(data) if data.claims["iat"].as_u64().unwrap_or(0) < state.not_before => {
            refuse("the token was revoked")
        }
        Ok(data) if !has_role(&data.claims, "Manage.All") => {
            refuse("the token lacks the Manage.All role")
        }
        Ok(_) => Verdict::Pass(Vec::new()),
        Err(e) => refuse(&format!("invalid token: {e}")),
    }
}

fn has_role(claims: &Value, role: &str) -> bool {
    claims["roles"]
        .as_array()
        .is_some_and(|roles| roles.iter().any(|r| r == role))
}

/// `POST …/oauth2/v2.0/token` (Entra, `scope`) or `POST /adfs/oauth2/token` (`resource`).
pub(crate) fn token_endpoint(
    state: &mut AuthState,
    endpoint_url: &str,
    entra: bool,
    body: &[u8],
) -> Response {
    let form: std::collections::HashMap<String, String> = form_urlencoded::parse(body)
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    let SimAuth::OAuth(app) = state.mode.clone() else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let audience = if entra {
        form.get("scope")
            .map(|s| s.trim_end_matches("/.default").to_string())
    } else {
        form.get("resource").cloned()
    };
    let checked = check_client(state, &app, endpoint_url, &form).and_then(|()| {
        audience.ok_or_else(|| {
            let (field, code) = if entra {
                ("scope", 900144)
            } else {
                ("resource", 0)
            };
            refusal(
                400,
                "invalid_request",
                code,
                &format!("The request body must contain the following parameter: '{field}'."),
            )
        })
    });
    match checked {
        Ok(audience) => issue(state, &app, &audience, entra),
        Err(refused) => {
            state.stats.token_refusals += 1;
            refused.into_response()
        }
    }
}

fn check_client(
    state: &mut AuthState,
    app: &OAuthApp,
    endpoint_url: &str,
    form: &std::collections::HashMap<String, String>,
) -> Result<(), Refusal> {
    if form.get("grant_type").map(String::as_str) != Some("client_credentials") {
        return Err(refusal(
            400,
            "unsupported_grant_type",
            70003,
            "The app requested an unsupported grant type.",
        ));
    }
    if form.get("client_id") != Some(&app.client_id) {
        return Err(refusal(
            400,
            "unauthorized_client",
            700016,
            "Application was not found in the directory.",
        ));
    }
    if let Some(secret) = form.get("client_secret") {
        return match &app.client_secret {
            Some(expected) if expected == secret => Ok(()),
            _ => Err(refusal(401, "invalid_client", 7000215, "Invalid client secret provided. Ensure the secret being sent in the request is the client secret value, not the client secret ID.")),
        };
    }
    let assertion_type = form.get("client_assertion_type").map(String::as_str);
    let (Some(assertion), Some("urn:ietf:params:oauth:client-assertion-type:jwt-bearer")) =
        (form.get("client_assertion"), assertion_type)
    else {
        return Err(refusal(401, "invalid_client", 7000218, "The request body must contain the following parameter: 'client_assertion' or 'client_secret'."));
    };
    verify_assertion(state, app, endpoint_url, assertion)
}

fn verify_assertion(
    state: &mut AuthState,
    app: &OAuthApp,
    endpoint_url: &str,
    assertion: &str,
) -> Result<(), Refusal> {
    let bad_signature = || {
        refusal(
            401,
            "invalid_client",
            700027,
            "Client assertion contains an invalid signature.",
        )
    };
    let header = jsonwebtoken::decode_header(assertion).map_err(|_| bad_signature())?;
    if !matches!(
        header.alg,
        jsonwebtoken::Algorithm::RS256 | jsonwebtoken::Algorithm::PS256
    ) || (header.x5t.is_none() && header.x5t_s256.is_none())
    {
        return Err(bad_signature());
    }
    let key = app
        .assertion_public_key
        .as_deref()
        .and_then(|pem| jsonwebtoken::DecodingKey::from_rsa_pem(pem).ok())
        .ok_or_else(bad_signature)?;
    let mut validation = jsonwebtoken::Validation::new(header.alg);
    validation.leeway = 0;
    validation.validate_nbf = true;
    validation.set_audience(&[endpoint_url]);
    validation.set_issuer(&[&app.client_id]);
    validation.sub = Some(app.client_id.clone());
    validation.set_required_spec_claims(&["exp", "nbf", "aud", "iss", "sub"]);
    let claims = match jsonwebtoken::decode::<Value>(assertion, &key, &validation) {
        Ok(data) => data.claims,
        Err(e) => {
            return Err(match e.kind() {
                jsonwebtoken::errors::ErrorKind::InvalidSignature => bad_signature(),
                _ => refusal(
                    401,
                    "invalid_client",
                    700024,
                    &format!("Client assertion is not valid: {e}."),
                ),
            })
        }
    };
    let span = claims["exp"]
        .as_u64()
        .unwrap_or(0)
        .saturating_sub(claims["nbf"].as_u64().unwrap_or(0));
    if span > 600 {
        return Err(refusal(
            401,
            "invalid_client",
            700024,
            "Client assertion is valid for more than 10 minutes.",
        ));
    }
    let jti = claims["jti"].as_str().unwrap_or_default().to_string();
    if jti.is_empty() || !state.seen_jti.insert(jti) {
        return Err(refusal(
            401,
            "invalid_client",
            700025,
            "Client assertion jti is missing or was used before.",
        ));
    }
    Ok(())
}

fn issue(state: &mut AuthState, app: &OAuthApp, audience: &str, entra: bool) -> Response {
    let iat = now();
    let lifetime = app.token_lifetime.as_secs().max(1);
    let claims = json!({
        "aud": audience, "iss": "https://sts.cardbridge.test/", "appid": app.client_id,
        "roles": app.roles, "iat": iat, "nbf": iat, "exp": iat + lifetime,
        "jti": format!("{:032x}", fastrand::u128(..)),
    });
    let key = jsonwebtoken::EncodingKey::from_secret(&state.signing_key);
    let Ok(token) = jsonwebtoken::encode(&jsonwebtoken::Header::default(), &claims, &key) else {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    };
    state.stats.tokens_issued += 1;
    state.stats.issued.push(token.clone());
    // AD FS writes expires_in as a number too, but older issuers used a string: send one here.
    let expires_in = if entra {
        json!(lifetime)
    } else {
        json!(lifetime.to_string())
    };
    (
        StatusCode::OK,
        axum::Json(json!({"token_type": "Bearer", "expires_in": expires_in, "ext_expires_in": lifetime, "access_token": token})),
    )
        .into_response()
}

/// A token endpoint's refusal, as Entra ID words it.
struct Refusal {
    status: u16,
    error: &'static str,
    code: u32,
    text: String,
}

fn refusal(status: u16, error: &'static str, code: u32, text: &str) -> Refusal {
    Refusal {
        status,
        error,
        code,
        text: text.to_string(),
    }
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        refusal_response(self.status, self.error, self.code, &self.text)
    }
}

fn refusal_response(status: u16, error: &str, code: u32, text: &str) -> Response {
    let description = if code == 0 {
        text.to_string()
    } else {
        format!("AADSTS{code}: {text}\r\nTrace ID: 0b1c2d3e-0000-4000-8000-000000000000\r\nCorrelation ID: 5f6e7d8c-0000-4000-8000-000000000000\r\nTimestamp: 2026-11-23 12:00:00Z")
    };
    let codes: Vec<u32> = if code == 0 { vec![] } else { vec![code] };
    (
        StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_REQUEST),
        axum::Json(json!({"error": error, "error_description": description, "error_codes": codes})),
    )
        .into_response()
}

fn now() -> u64 {
    jsonwebtoken::get_current_timestamp()
}
