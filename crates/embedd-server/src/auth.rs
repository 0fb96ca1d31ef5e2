//! Bearer-key authentication for the API routes. Without configured keys the server is open and
//! ignores whatever `Authorization` header clients send (`Bearer None` is common).

use axum::extract::{Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::Response;

use crate::error::ApiError;
use crate::state::AppState;

/// Who made a request: the key's short fingerprint, or "anonymous" on an open server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller(pub String);

pub async fn require_key(
    State(state): State<AppState>,
    mut request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let caller = if state.api_keys.is_empty() {
        Caller("anonymous".into())
    } else {
        let presented = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .map(str::trim)
            .ok_or(ApiError::Unauthorized)?;
        let known = state
            .api_keys
            .iter()
            .any(|k| constant_time_eq(k.as_bytes(), presented.as_bytes()));
        if !known {
            return Err(ApiError::Unauthorized);
        }
        Caller(fingerprint(presented))
    };
    request.extensions_mut().insert(caller);
    Ok(next.run(request).await)
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A stable, non-reversible id for a key (FNV-1a), so the key itself is never stored or logged.
fn fingerprint(key: &str) -> String {
    let hash = key.bytes().fold(0xcbf29ce484222325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100000001b3)
    });
    format!("key-{hash:016x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_are_stable_and_distinct() {
        assert_eq!(fingerprint("a"), fingerprint("a"));
        assert_ne!(fingerprint("a"), fingerprint("b"));
        assert!(!fingerprint("secret").contains("secret"));
    }

    #[test]
    fn key_comparison() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }
}
