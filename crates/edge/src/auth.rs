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
/// Every nook machine token starts with this (see nook-store's `create_api_token`). The edge
/// never hands one to a VM, valid for it or not: a VM's name can change hands, and a token
/// sent to the old name must not reach the new owner's app.
pub(crate) const TOKEN_PREFIX: &str = "nook_";
/// Where the dashboard remembers which page to return to across an out-of-band login.
pub(crate) const NEXT_COOKIE: &str = "__Host-nook_next";
/// Every cookie the edge owns starts with this; none of them reaches a VM.
pub(crate) const NOOK_COOKIE_PREFIX: &str = "__Host-nook";

/// A VM host sets `__Host-nook_s{STATE}` on the browser it sends to the dashboard to sign in,
/// and accepts a handoff code only from a browser holding the cookie for the code's state. So
/// nobody can sign a victim's browser into their own account on a VM host (login CSRF) by
/// sending it a handoff link. One cookie per sign-in, so tabs signing in at once cannot
/// overwrite each other's.
const STATE_COOKIE_PREFIX: &str = "__Host-nook_s";
pub(crate) const STATE_MAX_AGE: Duration = Duration::from_secs(600);

/// A fresh random token (256 bits, hex).
pub(crate) fn random_token() -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    hex::encode(bytes)
}

/// A fresh sign-in state (128 bits, hex); it is part of a cookie's name, so it is kept short.
pub(crate) fn random_state() -> String {
    let mut bytes = [0u8; 16];
    rand::rng().fill_bytes(&mut bytes);
    hex::encode(bytes)
}

/// Whether `s` looks like a state from [`random_state`] (anything else is never stored).
pub(crate) fn is_state(s: &str) -> bool {
    s.len() == 32 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

pub(crate) fn state_cookie_name(state: &str) -> String {
    format!("{STATE_COOKIE_PREFIX}{state}")
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
    /// The sign-in state of the browser the code was made for, when the dashboard knew it.
    state: Option<String>,
    expires: Instant,
}

/// A redeemed handoff code.
pub(crate) struct Redeemed {
    pub user_id: String,
    pub state: Option<String>,
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

    pub(crate) fn issue(&self, user_id: &str, host: &str, state: Option<&str>) -> String {
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
                    state: state.map(str::to_string),
                    expires: now + self.ttl,
                },
            );
        }
        code
    }

    /// Consumes `code` (even when it turns out to be for another host) and returns it if it is
    /// live and meant for `host`.
    pub(crate) fn redeem(&self, code: &str, host: &str) -> Option<Redeemed> {
        let h = self
            .codes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(code)?;
        (h.expires > Instant::now() && h.host == host).then_some(Redeemed {
            user_id: h.user_id,
            state: h.state,
        })
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
        let c = h.issue("u1", "a.nook.localhost", None);
        assert!(h.redeem(&c, "b.nook.localhost").is_none());
        assert!(h.redeem(&c, "a.nook.localhost").is_none());
        let c = h.issue("u1", "a.nook.localhost", Some("s1"));
        let r = h.redeem(&c, "a.nook.localhost").unwrap();
        assert_eq!((r.user_id.as_str(), r.state.as_deref()), ("u1", Some("s1")));
        assert!(h.redeem(&c, "a.nook.localhost").is_none());
    }

    #[test]
    fn states_are_short_hex() {
        let s = random_state();
        assert!(is_state(&s));
        assert!(!is_state("x"));
        assert!(!is_state(&"g".repeat(32)));
        assert!(set_cookie(&state_cookie_name(&s), "1", STATE_MAX_AGE).is_some());
    }

    #[test]
    fn cookie_values_are_restricted() {
        assert!(set_cookie(SESSION_COOKIE, "abc", Duration::from_secs(1)).is_some());
        assert!(set_cookie(SESSION_COOKIE, "a;b", Duration::from_secs(1)).is_none());
    }
}
