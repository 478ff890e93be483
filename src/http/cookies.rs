//! The cookies a server sets (a session cookie after a Negotiate handshake, a load balancer's
//! affinity cookie), kept for the next requests to it. A server is untrusted input, and one that
//! sets a new cookie with every answer would otherwise grow the jar without end over a station's
//! months, so the jar keeps at most [`MAX_COOKIES`] of at most [`MAX_COOKIE_BYTES`] each: the
//! least RFC 6265 (section 6.1) asks a user agent to keep per domain. The storage rules (domain,
//! path, expiry) are the `cookie_store` crate's, as in reqwest's own jar; only the bound is ours.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use reqwest::header::HeaderValue;
use reqwest::Url;

/// Cookies kept per server.
pub const MAX_COOKIES: usize = 50;
/// The longest `Set-Cookie` value kept (name, value and attributes).
pub const MAX_COOKIE_BYTES: usize = 4096;

#[derive(Debug, Default)]
pub struct CookieJar {
    store: Mutex<cookie_store::CookieStore>,
    /// Whether the refusal of a cookie was logged: once per jar is enough to explain it.
    refusal_logged: AtomicBool,
}

impl CookieJar {
    /// Keeps one `Set-Cookie` from `url`: a cookie the jar holds is always updated (or removed,
    /// when it comes expired); a new one only while there is room.
    fn keep(&self, header: &HeaderValue, url: &Url) {
        if header.len() > MAX_COOKIE_BYTES {
            self.refused("longer than 4096 bytes");
            return;
        }
        let Some(cookie) = header
            .to_str()
            .ok()
            .and_then(|text| cookie::Cookie::parse(text.to_string()).ok())
        else {
            return;
        };
        let mut store = self.store.lock().unwrap_or_else(|p| p.into_inner());
        if store.iter_any().count() >= MAX_COOKIES {
            *store = unexpired(&store);
        }
        if store.iter_any().count() < MAX_COOKIES {
            let _ = store.insert_raw(&cookie, url);
            return;
        }
        // Full: the cookie is kept only if it replaces one the jar holds.
        let mut next = store.clone();
        if next.insert_raw(&cookie, url).is_ok() && next.iter_any().count() <= MAX_COOKIES {
            *store = next;
        } else {
            self.refused("beyond the 50 kept per server");
        }
    }

    fn refused(&self, why: &str) {
        if !self.refusal_logged.swap(true, Ordering::Relaxed) {
            tracing::warn!("the server set a cookie {why}; it is not kept (logged once)");
        }
    }
}

/// The store without its expired cookies (a server expires a cookie by setting it again with a
/// date in the past; the store keeps it, marked expired).
fn unexpired(store: &cookie_store::CookieStore) -> cookie_store::CookieStore {
    let kept = store
        .iter_unexpired()
        .cloned()
        .map(Ok::<_, std::convert::Infallible>);
    match cookie_store::CookieStore::from_cookies(kept, false) {
        Ok(store) => store,
        Err(never) => match never {},
    }
}

impl reqwest::cookie::CookieStore for CookieJar {
    fn set_cookies(&self, headers: &mut dyn Iterator<Item = &HeaderValue>, url: &Url) {
        for header in headers {
            self.keep(header, url);
        }
    }

    fn cookies(&self, url: &Url) -> Option<HeaderValue> {
        let store = self.store.lock().unwrap_or_else(|p| p.into_inner());
        let pairs: Vec<String> = store
            .get_request_values(url)
            .map(|(name, value)| format!("{name}={value}"))
            .collect();
        if pairs.is_empty() {
            return None;
        }
        HeaderValue::from_str(&pairs.join("; ")).ok()
    }
}

#[cfg(test)]
mod tests {
    use reqwest::cookie::CookieStore;

    use super::*;

    fn url() -> Url {
        Url::parse("https://cm.example.test/CertificateManagement/api/v1.0/smartcards").unwrap()
    }

    fn set(jar: &CookieJar, header: &str) {
        let value = HeaderValue::from_str(header).unwrap();
        jar.set_cookies(&mut std::iter::once(&value), &url());
    }

    fn sent(jar: &CookieJar) -> String {
        jar.cookies(&url())
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default()
    }

    #[test]
    fn a_cookie_set_is_sent_back() {
        let jar = CookieJar::default();
        set(&jar, "CMSESSION=abc; Path=/; HttpOnly");
        assert_eq!(sent(&jar), "CMSESSION=abc");
    }

    #[test]
    fn a_server_setting_a_new_cookie_with_every_answer_fills_the_jar_only_to_its_bound() {
        let jar = CookieJar::default();
        set(&jar, "CMSESSION=first; Path=/");
        for n in 0..500 {
            set(&jar, &format!("affinity{n}=x; Path=/"));
        }
        let count = jar.store.lock().unwrap().iter_any().count();
        assert_eq!(count, MAX_COOKIES);
        // A cookie the jar holds is still updated when it is full.
        set(&jar, "CMSESSION=second; Path=/");
        assert!(sent(&jar).contains("CMSESSION=second"), "{}", sent(&jar));
        assert!(!sent(&jar).contains("affinity499"));
    }

    #[test]
    fn an_expired_cookie_makes_room_for_a_new_one() {
        let jar = CookieJar::default();
        for n in 0..MAX_COOKIES {
            set(&jar, &format!("c{n}=x; Path=/"));
        }
        set(&jar, "c0=; Path=/; Max-Age=0");
        set(&jar, "fresh=y; Path=/");
        assert!(sent(&jar).contains("fresh=y"), "{}", sent(&jar));
        assert!(!sent(&jar).contains("c0="));
    }

    #[test]
    fn a_cookie_longer_than_the_bound_is_not_kept() {
        let jar = CookieJar::default();
        set(
            &jar,
            &format!("big={}; Path=/", "x".repeat(MAX_COOKIE_BYTES)),
        );
        assert_eq!(sent(&jar), "");
    }
}
