//! Cookies, credentials in requests, and one-time handoff codes.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use hyper::HeaderMap;
use hyper::header::{AUTHORIZATION, COOKIE, HeaderValue};
use rand::RngCore;

/// The session cookie. `__Host-` makes browsers refuse it unless it is Secure, host-only (no
/// Domain attribute) and for Path=/, so a VM can neither set it for its parent domain nor
/// shadow the dashboard's.
pub(crate) const SESSION_COOKIE: &str = "__Host-nook_session";
/// Where the dashboard remembers which page to return to across an out-of-band login.
pub(crate) const NEXT_COOKIE: &str = "__Host-nook_next";
/// Every cookie the edge owns starts with this; none of them reaches a VM.
pub(crate) const NOOK_COOKIE_PREFIX: &str = "__Host-nook";

/// A fresh random token (256 bits, hex).
pub(crate) fn random_token() -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    hex::encode(bytes)
}

/// Iterates over `name=value` pairs of every Cookie header (HTTP/2 may split them).
fn cookie_pairs(headers: &HeaderMap) -> impl Iterator<Item = (&str, &str)> {
    headers
        .get_all(COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| {
            let (n, v) = pair.trim().split_once('=')?;
            Some((n.trim(), v.trim()))
        })
}

pub(crate) fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    cookie_pairs(headers)
        .find(|(n, _)| *n == name)
        .map(|(_, v)| v)
}

/// Rewrites the Cookie headers without the edge's own cookies (the VM must never see a
/// session secret: it could replay it).
pub(crate) fn strip_nook_cookies(headers: &mut HeaderMap) {
    if !headers.contains_key(COOKIE) {
        return;
    }
    let kept: Vec<String> = headers
        .get_all(COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .map(str::trim)
        .filter(|p| !p.is_empty() && !p.starts_with(NOOK_COOKIE_PREFIX))
        .map(str::to_string)
        .collect();
    headers.remove(COOKIE);
    if !kept.is_empty()
        && let Ok(v) = HeaderValue::from_str(&kept.join("; "))
    {
        headers.insert(COOKIE, v);
    }
}

/// A host-only, Secure, HttpOnly, SameSite=Lax cookie. Values are restricted to URL-safe
/// characters so no quoting is ever needed.
pub(crate) fn set_cookie(name: &str, value: &str, max_age: Duration) -> Option<HeaderValue> {
    if !value
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"-_.~%".contains(&b))
    {
        return None;
    }
    HeaderValue::from_str(&format!(
        "{name}={value}; Path=/; Secure; HttpOnly; SameSite=Lax; Max-Age={}",
        max_age.as_secs()
    ))
    .ok()
}

pub(crate) fn clear_cookie(name: &str) -> HeaderValue {
    HeaderValue::from_str(&format!(
        "{name}=; Path=/; Secure; HttpOnly; SameSite=Lax; Max-Age=0"
    ))
    .unwrap_or_else(|_| HeaderValue::from_static(""))
}

/// A machine token from `Authorization: Bearer T` or as the password of basic auth.
pub(crate) fn authorization_token(headers: &HeaderMap) -> Option<String> {
    let v = headers.get(AUTHORIZATION)?.to_str().ok()?.trim();
    let (scheme, rest) = v.split_once(' ')?;
    let rest = rest.trim();
    if scheme.eq_ignore_ascii_case("bearer") {
        return (!rest.is_empty()).then(|| rest.to_string());
    }
    if scheme.eq_ignore_ascii_case("basic") {
        use base64::Engine;
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(rest)
            .ok()?;
        let text = String::from_utf8(decoded).ok()?;
        let (_, password) = text.split_once(':')?;
        return (!password.is_empty()).then(|| password.to_string());
    }
    None
}

struct Handoff {
    user_id: String,
    host: String,
    expires: Instant,
}

/// One-time codes that carry a dashboard login to one VM host. They live only in memory:
/// they are valid for seconds, and losing them on restart merely asks for a reload.
pub(crate) struct Handoffs {
    ttl: Duration,
    codes: Mutex<HashMap<String, Handoff>>,
}

/// Bounds memory if someone mints codes in a loop (only signed-in users can).
const MAX_HANDOFFS: usize = 100_000;

impl Handoffs {
    pub(crate) fn new(ttl: Duration) -> Self {
        Self {
            ttl,
            codes: Mutex::new(HashMap::new()),
        }
    }

    pub(crate) fn issue(&self, user_id: &str, host: &str) -> String {
        let code = random_token();
        let now = Instant::now();
        let mut codes = self.codes.lock().unwrap_or_else(|e| e.into_inner());
        if codes.len() >= MAX_HANDOFFS / 2 {
            codes.retain(|_, h| h.expires > now);
        }
        if codes.len() < MAX_HANDOFFS {
            codes.insert(
                code.clone(),
                Handoff {
                    user_id: user_id.to_string(),
                    host: host.to_string(),
                    expires: now + self.ttl,
                },
            );
        }
        code
    }

    /// Consumes `code` (even when it turns out to be for another host) and returns its user if
    /// it is live and meant for `host`.
    pub(crate) fn redeem(&self, code: &str, host: &str) -> Option<String> {
        let h = self
            .codes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(code)?;
        (h.expires > Instant::now() && h.host == host).then_some(h.user_id)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn reads_tokens() {
        let mut h = HeaderMap::new();
        h.insert(AUTHORIZATION, HeaderValue::from_static("Bearer abc"));
        assert_eq!(authorization_token(&h).as_deref(), Some("abc"));
        // "git:tok" in base64
        h.insert(
            AUTHORIZATION,
            HeaderValue::from_static("Basic Z2l0OnRvaw=="),
        );
        assert_eq!(authorization_token(&h).as_deref(), Some("tok"));
        h.insert(AUTHORIZATION, HeaderValue::from_static("Basic !!!"));
        assert_eq!(authorization_token(&h), None);
        h.insert(AUTHORIZATION, HeaderValue::from_static("Digest x"));
        assert_eq!(authorization_token(&h), None);
    }

    #[test]
    fn strips_only_nook_cookies() {
        let mut h = HeaderMap::new();
        h.append(
            COOKIE,
            HeaderValue::from_static("a=1; __Host-nook_session=s"),
        );
        h.append(COOKIE, HeaderValue::from_static("b=2"));
        assert_eq!(cookie(&h, SESSION_COOKIE), Some("s"));
        strip_nook_cookies(&mut h);
        assert_eq!(h.get(COOKIE).unwrap(), "a=1; b=2");
        let mut h = HeaderMap::new();
        h.insert(COOKIE, HeaderValue::from_static("__Host-nook_session=s"));
        strip_nook_cookies(&mut h);
        assert!(h.get(COOKIE).is_none());
    }

    #[test]
    fn handoff_is_single_use_and_host_bound() {
        let h = Handoffs::new(Duration::from_secs(60));
        let c = h.issue("u1", "a.nook.localhost");
        assert_eq!(h.redeem(&c, "b.nook.localhost"), None);
        assert_eq!(h.redeem(&c, "a.nook.localhost"), None);
        let c = h.issue("u1", "a.nook.localhost");
        assert_eq!(h.redeem(&c, "a.nook.localhost").as_deref(), Some("u1"));
        assert_eq!(h.redeem(&c, "a.nook.localhost"), None);
    }

    #[test]
    fn cookie_values_are_restricted() {
        assert!(set_cookie(SESSION_COOKIE, "abc", Duration::from_secs(1)).is_some());
        assert!(set_cookie(SESSION_COOKIE, "a;b", Duration::from_secs(1)).is_none());
    }
}
