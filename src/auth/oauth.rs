//! OAuth 2.0 client credentials (RFC 6749 §4.4) against Entra ID v2 (`scope`) or AD FS
//! (`resource`), with a client secret or a signed client assertion (RFC 7523, private_key_jwt).
//!
//! A form POST on the server's own `reqwest` client and `jsonwebtoken` for the assertion: the
//! OAuth crates have no private_key_jwt, and the cloud SDKs bring a second HTTP stack.
//!
//! The rules:
//! - a token is used until the earlier of half its lifetime and 5 minutes before it expires
//!   (for a token shorter than 10 minutes, which no real issuer gives, half its lifetime);
//! - one refresh at a time: callers wait on the cache's lock, and the first one fetches;
//! - when a refresh fails while the old token is still valid, the old token keeps serving;
//! - a token the server refused (`401`) is dropped, and the next caller fetches a new one;
//! - the secret and the key are read from their files at each fetch, so a rotated secret is
//!   used without a restart.

use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde::{Deserialize, Serialize};
use sha1::Sha1;
use sha2::{Digest, Sha256};
use tokio::sync::Mutex;

use super::secret::SecretPath;
use super::AuthError;

/// The most a token endpoint's answer may hold.
const MAX_BODY: usize = 64 * 1024;
/// How long a client assertion is valid (the issuers allow at most 10 minutes).
const ASSERTION_LIFETIME: u64 = 300;

/// What the token is for: Entra ID v2 takes a `scope`, AD FS a `resource`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Audience {
    Scope(String),
    Resource(String),
}

/// How the client proves itself to the token endpoint.
#[derive(Debug, Clone)]
pub enum ClientCredential {
    Secret(SecretPath),
    /// A JWT signed with the key of the certificate registered for the application.
    Assertion {
        certificate_der: Vec<u8>,
        key: SecretPath,
    },
}

/// A token source for one server.
pub struct TokenSource {
    http: reqwest::Client,
    token_url: String,
    client_id: String,
    audience: Audience,
    credential: ClientCredential,
    cache: Mutex<Option<Token>>,
    /// Token requests sent (tests and benchmarks count them).
    fetches: std::sync::atomic::AtomicU64,
}

/// An access token and when to stop using it. Its `Debug` shows no token.
#[derive(Clone)]
pub struct Token {
    pub value: Arc<str>,
    refresh_at: Instant,
    expires_at: Instant,
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Token")
            .field("value", &"<redacted>")
            .field("refresh_at", &self.refresh_at)
            .field("expires_at", &self.expires_at)
            .finish()
    }
}

impl TokenSource {
    /// `http` should not follow redirects (a token endpoint never redirects a client POST).
    pub fn new(
        http: reqwest::Client,
        token_url: String,
        client_id: String,
        audience: Audience,
        credential: ClientCredential,
    ) -> TokenSource {
        TokenSource {
            http,
            token_url,
            client_id,
            audience,
            credential,
            cache: Mutex::new(None),
            fetches: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// A token to use now: the cached one while it is fresh, else a new one.
    pub async fn token(&self) -> Result<Token, AuthError> {
        let mut cache = self.cache.lock().await;
        let now = Instant::now();
        if let Some(token) = cache.as_ref().filter(|t| now < t.refresh_at) {
            return Ok(token.clone());
        }
        match self.fetch().await {
            Ok(token) => {
                *cache = Some(token.clone());
                Ok(token)
            }
            Err(e) => match cache.as_ref().filter(|t| now < t.expires_at) {
                Some(old) => {
                    tracing::warn!("OAuth token refresh failed, the current token serves until it expires: {e}");
                    Ok(old.clone())
                }
                None => Err(e),
            },
        }
    }

    /// The server refused `rejected`: forget it (unless another caller already replaced it),
    /// then return a token to retry with.
    pub async fn token_after_rejection(&self, rejected: &Token) -> Result<Token, AuthError> {
        {
            let mut cache = self.cache.lock().await;
            if cache.as_ref().is_some_and(|t| t.value == rejected.value) {
                *cache = None;
            }
        }
        self.token().await
    }

    /// The cached token, without fetching one.
    pub async fn current(&self) -> Option<Token> {
        self.cache.lock().await.clone()
    }

    /// Token requests sent so far.
    pub fn fetches(&self) -> u64 {
        self.fetches.load(std::sync::atomic::Ordering::Relaxed)
    }

    async fn fetch(&self) -> Result<Token, AuthError> {
        let mut form: Vec<(&str, String)> = vec![
            ("grant_type", "client_credentials".into()),
            ("client_id", self.client_id.clone()),
        ];
        match &self.audience {
            Audience::Scope(scope) => form.push(("scope", scope.clone())),
            Audience::Resource(resource) => form.push(("resource", resource.clone())),
        }
        match &self.credential {
            ClientCredential::Secret(secret) => form.push(("client_secret", secret.read_text()?)),
            ClientCredential::Assertion {
                certificate_der,
                key,
            } => {
                let algorithm = match self.audience {
                    // Entra ID asks for PS256; AD FS documents RS256.
                    Audience::Scope(_) => jsonwebtoken::Algorithm::PS256,
                    Audience::Resource(_) => jsonwebtoken::Algorithm::RS256,
                };
                let jwt = assertion(
                    &self.token_url,
                    &self.client_id,
                    certificate_der,
                    &key.read()?,
                    algorithm,
                    unix_now(),
                )?;
                form.push((
                    "client_assertion_type",
                    "urn:ietf:params:oauth:client-assertion-type:jwt-bearer".into(),
                ));
                form.push(("client_assertion", jwt));
            }
        }
        self.fetches
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let sent_at = Instant::now();
        let endpoint = |detail: String| AuthError::TokenEndpoint { detail };
        let mut response = self
            .http
            .post(&self.token_url)
            .form(&form)
            .send()
            .await
            .map_err(|e| {
                endpoint(format!(
                    "{}: {}",
                    self.token_url,
                    crate::error_text::chain(&e)
                ))
            })?;
        let status = response.status().as_u16();
        let mut body = Vec::new();
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|e| endpoint(crate::error_text::chain(&e)))?
        {
            if body.len() + chunk.len() > MAX_BODY {
                return Err(endpoint(format!(
                    "the answer ({status}) is larger than 64 KiB"
                )));
            }
            body.extend_from_slice(&chunk);
        }
        let (value, lifetime) = parse_token_response(status, &body)?;
        Ok(Token {
            value: value.into(),
            refresh_at: sent_at + refresh_after(lifetime),
            expires_at: sent_at + lifetime,
        })
    }
}

/// When to fetch again: the earlier of half the lifetime and 5 minutes before expiry; half the
/// lifetime for a token shorter than 10 minutes (5 minutes before its expiry is too early).
pub fn refresh_after(lifetime: Duration) -> Duration {
    let half = lifetime / 2;
    match lifetime.checked_sub(Duration::from_secs(300)) {
        Some(early) if lifetime >= Duration::from_secs(600) => half.min(early),
        _ => half,
    }
}

#[derive(Deserialize)]
struct TokenAnswer {
    access_token: Option<String>,
    token_type: Option<String>,
    /// A number, or a string of one (Azure AD v1 and some AD FS versions).
    expires_in: Option<serde_json::Value>,
    error: Option<String>,
    error_description: Option<String>,
    error_codes: Option<Vec<serde_json::Value>>,
}

/// The start of an answer that is not a token response, to show what came instead (a proxy's
/// page, an HTML error). An answer that names a token (`access_token`, `refresh_token`…) may
/// hold one, so it is withheld.
fn excerpt(body: &[u8]) -> String {
    if body.windows(6).any(|w| w.eq_ignore_ascii_case(b"_token")) {
        return "(not shown: it names a token)".into();
    }
    String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned()
}

/// The access token and its lifetime, or the endpoint's refusal with its words and AADSTS code.
pub fn parse_token_response(status: u16, body: &[u8]) -> Result<(String, Duration), AuthError> {
    let answer: TokenAnswer =
        serde_json::from_slice(body).map_err(|e| AuthError::TokenEndpoint {
            detail: format!(
                "the answer ({status}) is not a token response ({} at line {} column {}): {}",
                json_problem(&e),
                e.line(),
                e.column(),
                excerpt(body)
            ),
        })?;
    if let Some(error) = answer.error {
        let description = answer
            .error_description
            .unwrap_or_default()
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect::<Vec<_>>()
            .join(" ");
        let code = answer
            .error_codes
            .and_then(|codes| codes.first().map(|c| format!("AADSTS{c}")))
            .or_else(|| aadsts(&description));
        return Err(AuthError::TokenEndpointRefused {
            status,
            error,
            description,
            code,
        });
    }
    let bad = |detail: &str| AuthError::TokenEndpoint {
        detail: format!("the answer ({status}) {detail}"),
    };
    if !(200..300).contains(&status) {
        return Err(bad("is an error without an error code"));
    }
    let token = answer
        .access_token
        .filter(|t| !t.is_empty())
        .ok_or_else(|| bad("has no access_token"))?;
    if let Some(kind) = answer.token_type {
        if !kind.eq_ignore_ascii_case("bearer") {
            return Err(bad(&format!("has token_type {kind:?}, not Bearer")));
        }
    }
    let seconds = match answer.expires_in {
        Some(serde_json::Value::Number(n)) => n.as_u64(),
        Some(serde_json::Value::String(s)) => s.trim().parse().ok(),
        _ => None,
    }
    .filter(|s| *s > 0)
    .ok_or_else(|| bad("has no positive expires_in"))?;
    Ok((token, Duration::from_secs(seconds)))
}

/// What is wrong with an answer that is not a token response, without serde_json's own words:
/// they quote the value they stumbled on, which may be the token (fuzzing found an answer whose
/// token was spelled like a number the message quoted).
fn json_problem(e: &serde_json::Error) -> &'static str {
    match e.classify() {
        serde_json::error::Category::Syntax => "not JSON",
        serde_json::error::Category::Data => "JSON of another shape",
        serde_json::error::Category::Eof => "JSON cut short",
        serde_json::error::Category::Io => "unreadable",
    }
}

fn aadsts(text: &str) -> Option<String> {
    let start = text.find("AADSTS")?;
    let digits: String = text[start + 6..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    (!digits.is_empty()).then(|| format!("AADSTS{digits}"))
}

#[derive(Serialize)]
struct AssertionClaims<'a> {
    aud: &'a str,
    iss: &'a str,
    sub: &'a str,
    jti: String,
    nbf: u64,
    iat: u64,
    exp: u64,
}

/// The signed client assertion: `x5t#S256` and `x5t` of the certificate in the header;
/// `aud` the token endpoint, `iss` = `sub` the client id, a unique `jti`, 5 minutes of validity.
pub fn assertion(
    token_url: &str,
    client_id: &str,
    certificate_der: &[u8],
    key_pem: &[u8],
    algorithm: jsonwebtoken::Algorithm,
    now: u64,
) -> Result<String, AuthError> {
    let failed = |detail: String| AuthError::Assertion { detail };
    let b64 = |bytes: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
    let mut header = jsonwebtoken::Header::new(algorithm);
    header.x5t_s256 = Some(b64(&Sha256::digest(certificate_der)));
    header.x5t = Some(b64(&Sha1::digest(certificate_der)));
    let key = jsonwebtoken::EncodingKey::from_rsa_pem(key_pem)
        .map_err(|e| failed(format!("the key is not an RSA private key in PEM: {e}")))?;
    let claims = AssertionClaims {
        aud: token_url,
        iss: client_id,
        sub: client_id,
        jti: crate::random::random_hex::<16>()
            .map_err(|e| failed(format!("no randomness for jti: {e}")))?,
        nbf: now,
        iat: now,
        exp: now + ASSERTION_LIFETIME,
    };
    jsonwebtoken::encode(&header, &claims, &key).map_err(|e| failed(e.to_string()))
}

/// The claims `check-config --online` shows, read from a JWT access token without verifying it
/// (only the server can; this is information for the administrator).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct TokenClaims {
    #[serde(default, deserialize_with = "one_or_many")]
    pub aud: Vec<String>,
    #[serde(default)]
    pub roles: Vec<String>,
    pub exp: Option<i64>,
}

fn one_or_many<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(match OneOrMany::deserialize(d)? {
        OneOrMany::One(s) => vec![s],
        OneOrMany::Many(v) => v,
    })
}

/// The payload of a JWT, unverified; `None` for an opaque token.
pub fn peek_claims(token: &str) -> Option<TokenClaims> {
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    serde_json::from_slice(&bytes).ok()
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refreshes_at_half_life_or_five_minutes_before_expiry() {
        let s = Duration::from_secs;
        assert_eq!(refresh_after(s(3600)), s(1800));
        assert_eq!(refresh_after(s(600)), s(300));
        assert_eq!(refresh_after(s(5400)), s(2700));
        // Short tokens: half the lifetime, never "already stale".
        assert_eq!(refresh_after(s(120)), s(60));
        assert_eq!(refresh_after(s(4)), s(2));
    }

    #[test]
    fn an_answer_that_is_not_a_token_response_is_shown_unless_it_names_a_token() {
        let e = parse_token_response(502, b"<html>Bad Gateway</html>").unwrap_err();
        assert!(e.to_string().contains("Bad Gateway"), "{e}");
        // Cut off after the token: not JSON, and the token must not reach the error (and logs).
        let e = parse_token_response(
            200,
            br#"{"access_token":"eyJ0eXAiOiJKV1Qi.secret-part","expires_in":3"#,
        )
        .unwrap_err();
        assert!(!e.to_string().contains("secret-part"), "{e}");
        assert!(e.to_string().contains("not shown"), "{e}");
    }

    #[test]
    fn reads_tokens_of_both_issuers() {
        let (t, l) = parse_token_response(
            200,
            br#"{"token_type":"Bearer","expires_in":3599,"ext_expires_in":3599,"access_token":"eyJ0"}"#,
        )
        .unwrap();
        assert_eq!((t.as_str(), l), ("eyJ0", Duration::from_secs(3599)));
        let (_, l) = parse_token_response(
            200,
            br#"{"token_type":"bearer","expires_in":"3600","access_token":"x"}"#,
        )
        .unwrap();
        assert_eq!(l, Duration::from_secs(3600));
    }

    #[test]
    fn keeps_the_endpoints_words_and_aadsts_code() {
        let e = parse_token_response(
            401,
            br#"{"error":"invalid_client","error_description":"AADSTS7000215: Invalid client secret provided.\r\nTrace ID: 1\r\nCorrelation ID: 2","error_codes":[7000215]}"#,
        )
        .unwrap_err();
        assert_eq!(e.cause(), "token_endpoint_refused");
        let text = e.to_string();
        assert!(
            text.contains("(AADSTS7000215)") && text.contains("invalid_client"),
            "{text}"
        );
        assert!(
            text.contains("Invalid client secret provided. Trace ID: 1"),
            "{text}"
        );
        // AD FS: no error_codes, sometimes the code only in the text.
        let e = parse_token_response(400, br#"{"error":"invalid_grant","error_description":"MSIS9622: Client authentication failed."}"#).unwrap_err();
        assert!(
            matches!(e, AuthError::TokenEndpointRefused { code: None, .. }),
            "{e:?}"
        );
    }

    #[test]
    fn refuses_answers_that_are_not_tokens() {
        for (status, body) in [
            (200, &b"<html>sign in</html>"[..]),
            (200, br#"{"token_type":"Bearer","expires_in":3599}"#),
            (200, br#"{"token_type":"Bearer","access_token":"x"}"#),
            (
                200,
                br#"{"token_type":"pop","expires_in":3599,"access_token":"x"}"#,
            ),
            (200, br#"{"expires_in":0,"access_token":"x"}"#),
            (500, br#"{}"#),
        ] {
            let e = parse_token_response(status, body).unwrap_err();
            assert_eq!(e.cause(), "token_endpoint", "{status} {body:?}");
        }
    }

    #[test]
    fn peeks_at_claims_without_trusting_them() {
        let payload = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(br#"{"aud":"api://scepman","roles":["Manage.All"],"exp":1800000000}"#);
        let c = peek_claims(&format!("e30.{payload}.sig")).unwrap();
        assert_eq!(c.aud, vec!["api://scepman"]);
        assert_eq!(c.roles, vec!["Manage.All"]);
        assert_eq!(c.exp, Some(1_800_000_000));
        assert_eq!(peek_claims("opaque-token"), None);
    }
}
