//! API keys -> principals. Keys are compared in constant time against every configured key (no early exit),
//! and never logged. With no keys configured, every caller is the principal `local`.

use agentd_core::config::ApiKey;
use agentd_core::service::Principal;
use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use subtle::ConstantTimeEq;

use crate::error::ApiError;
use crate::AppState;

pub struct Keys {
    keys: Vec<ApiKey>,
}

impl Keys {
    pub fn new(keys: &[ApiKey]) -> Keys {
        Keys {
            keys: keys.to_vec(),
        }
    }

    pub fn enabled(&self) -> bool {
        !self.keys.is_empty()
    }

    /// The principal a presented key belongs to.
    pub fn check(&self, presented: Option<&str>) -> Option<Principal> {
        if self.keys.is_empty() {
            return Some(Principal::local());
        }
        let presented = presented?.as_bytes();
        let mut found: Option<&ApiKey> = None;
        for k in &self.keys {
            if bool::from(k.key.as_bytes().ct_eq(presented)) {
                found = Some(k);
            }
        }
        found.map(|k| Principal {
            name: k.principal.clone(),
            admin: k.admin,
        })
    }
}

/// `Authorization: Bearer KEY`.
pub fn bearer(parts: &Parts) -> Option<&str> {
    parts
        .headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(bearer_credentials)
}

/// The credentials of a `Bearer` authorization value. The scheme is case-insensitive (RFC 7235 section 2.1:
/// `Bearer`, `bearer`, `BEARER` alike), followed by one or more spaces.
fn bearer_credentials(value: &str) -> Option<&str> {
    let (scheme, rest) = value.trim_start().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let key = rest.trim();
    (!key.is_empty()).then_some(key)
}

/// `?api_key=KEY` (WebSocket and SSE, where browsers cannot set headers).
pub fn query_key(parts: &Parts) -> Option<String> {
    let q = parts.uri.query()?;
    q.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=')?;
        (k == "api_key").then(|| percent_decode(v))
    })
}

/// Minimal percent-decoding for query values.
pub fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3])
                    .ok()
                    .and_then(|h| u8::from_str_radix(h, 16).ok());
                match hex {
                    Some(b) => {
                        out.push(b);
                        i += 3;
                    }
                    None => {
                        out.push(b'%');
                        i += 1;
                    }
                }
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The authenticated caller of a REST request (header only).
pub struct Caller(pub Principal);

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        state
            .auth
            .check(bearer(parts))
            .map(Caller)
            .ok_or_else(ApiError::unauthenticated)
    }
}

/// The caller of a WebSocket or SSE request: header or `?api_key=`.
pub struct StreamCaller(pub Principal);

impl FromRequestParts<AppState> for StreamCaller {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let q = query_key(parts);
        let presented = bearer(parts).map(str::to_string).or(q);
        state
            .auth
            .check(presented.as_deref())
            .map(StreamCaller)
            .ok_or_else(ApiError::unauthenticated)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_map_to_principals() {
        let keys = Keys::new(&[
            ApiKey {
                principal: "alice".into(),
                key: "sk-a".into(),
                admin: false,
            },
            ApiKey {
                principal: "root".into(),
                key: "sk-r".into(),
                admin: true,
            },
        ]);
        assert_eq!(keys.check(Some("sk-a")).unwrap().name, "alice");
        assert!(keys.check(Some("sk-r")).unwrap().admin);
        assert!(keys.check(Some("sk-")).is_none());
        assert!(keys.check(None).is_none());
        assert_eq!(Keys::new(&[]).check(None).unwrap().name, "local");
        assert_eq!(percent_decode("a%20b+c%2"), "a b c%2");
    }

    #[test]
    fn the_bearer_scheme_is_case_insensitive() {
        for value in [
            "Bearer sk-a",
            "bearer sk-a",
            "BEARER sk-a",
            "bEaReR sk-a",
            "Bearer   sk-a ",
        ] {
            assert_eq!(bearer_credentials(value), Some("sk-a"), "{value:?}");
        }
        for value in [
            "Basic sk-a",
            "Bearersk-a",
            "Bearer",
            "Bearer   ",
            "sk-a",
            "Token sk-a",
        ] {
            assert_eq!(bearer_credentials(value), None, "{value:?}");
        }
    }
}
