//! Authentication and room permissions: who a connection is, and which rooms it may enter.
//!
//! In `anonymous` mode everyone is a guest with a generated id. In `jwt` mode a connection
//! needs a valid token before it is upgraded; its identity (user id, display name, admin
//! role, allowed rooms, expiry) comes from the token's claims and never from anything the
//! client sends later. Exactly one algorithm is accepted, with a key of its own family, so
//! neither `alg: none` nor algorithm confusion (an HMAC token "signed" with an RSA public
//! key) can get through. Refusals are logged with their reason, never with the token.

use std::sync::Arc;

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::{Map, Value};
use warp::http::{HeaderMap, header};

use crate::config::{AuthMode, AuthSettings, ConfigError};
use crate::conn::Profile;
use crate::protocol::RoomName;

/// The Sec-WebSocket-Protocol a browser offers, followed by the token, to authenticate
/// without headers or query strings: `new WebSocket(url, ["rtgate.bearer", token])`.
pub const BEARER_PROTOCOL: &str = "rtgate.bearer";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("no token")]
    Missing,
    #[error("malformed token")]
    Malformed,
    #[error("token expired")]
    Expired,
    #[error("token not valid yet")]
    NotYetValid,
    #[error("bad token signature")]
    BadSignature,
    #[error("token algorithm not accepted")]
    WrongAlgorithm,
    #[error("token audience not accepted")]
    WrongAudience,
    #[error("token issuer not accepted")]
    WrongIssuer,
    #[error("token lacks a required claim ({0})")]
    MissingClaim(String),
    #[error("token claim {claim} must be {expected}")]
    InvalidClaim { claim: String, expected: &'static str },
    #[error("token belongs to another user")]
    OtherUser,
}

/// Where a token was found; a subprotocol must be echoed in the 101 response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenSource {
    Header,
    Query,
    Subprotocol,
}

pub struct Auth {
    settings: AuthSettings,
    key: Option<(DecodingKey, Validation)>,
}

impl Auth {
    pub fn new(settings: &AuthSettings) -> Result<Auth, ConfigError> {
        let key = match settings.mode {
            AuthMode::Anonymous => None,
            AuthMode::Jwt => Some(decoding_key(settings)?),
        };
        Ok(Auth { settings: settings.clone(), key })
    }

    pub fn mode(&self) -> AuthMode {
        self.settings.mode
    }

    /// The token a request carries: `Authorization: Bearer`, `?token=`, or the
    /// `rtgate.bearer` subprotocol pair, in that order of preference.
    pub fn token_from(headers: &HeaderMap, query: &str) -> Option<(String, TokenSource)> {
        if let Some(auth) = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok())
            && let Some(token) = auth.strip_prefix("Bearer ").or_else(|| auth.strip_prefix("bearer "))
        {
            return Some((token.trim().to_string(), TokenSource::Header));
        }
        for pair in query.split('&') {
            if let Some(token) = pair.strip_prefix("token=") {
                return Some((percent_decode(token), TokenSource::Query));
            }
        }
        let offered: Vec<&str> = headers
            .get_all(header::SEC_WEBSOCKET_PROTOCOL)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .collect();
        let at = offered.iter().position(|p| *p == BEARER_PROTOCOL)?;
        offered.get(at + 1).map(|t| (t.to_string(), TokenSource::Subprotocol))
    }

    /// Verifies a token and derives the identity from its claims: `(user id, profile)`.
    pub fn verify(&self, token: &str, max_name_chars: usize) -> Result<(Arc<str>, Profile), AuthError> {
        let Some((key, validation)) = &self.key else {
            return Err(AuthError::Missing);
        };
        let data = jsonwebtoken::decode::<Map<String, Value>>(token, key, validation).map_err(|e| match e.kind() {
            ErrorKind::ExpiredSignature => AuthError::Expired,
            ErrorKind::ImmatureSignature => AuthError::NotYetValid,
            ErrorKind::InvalidSignature => AuthError::BadSignature,
            ErrorKind::InvalidAlgorithm | ErrorKind::InvalidAlgorithmName | ErrorKind::MissingAlgorithm => {
                AuthError::WrongAlgorithm
            }
            ErrorKind::InvalidAudience => AuthError::WrongAudience,
            ErrorKind::InvalidIssuer => AuthError::WrongIssuer,
            ErrorKind::MissingRequiredClaim(c) => AuthError::MissingClaim(c.clone()),
            _ => AuthError::Malformed,
        })?;
        let claims = data.claims;
        let s = &self.settings;
        // `sub` and `exp` are read here rather than by jsonwebtoken, so that a wrong type is
        // reported as such and expiry has one rule (`expired`) at connect and afterwards.
        let sub = match claims.get("sub") {
            Some(Value::String(s)) if !s.is_empty() && s.len() <= 256 => s.clone(),
            // Some issuers number their users; the id is the number's decimal text.
            Some(Value::Number(n)) if n.is_i64() || n.is_u64() => n.to_string(),
            None => return Err(AuthError::MissingClaim("sub".into())),
            Some(_) => return Err(invalid_claim("sub", "a string of 1 to 256 bytes or an integer")),
        };
        let expires_at = match claims.get("exp") {
            Some(Value::Number(n)) => match (n.as_u64(), n.as_f64()) {
                (Some(exp), _) => exp,
                (None, Some(exp)) if exp.is_finite() && exp >= 0.0 => exp as u64,
                _ => return Err(invalid_claim("exp", "a number")),
            },
            None => return Err(AuthError::MissingClaim("exp".into())),
            Some(_) => return Err(invalid_claim("exp", "a number")),
        };
        if expired(expires_at, crate::clock::now_secs(), s.leeway_seconds) {
            return Err(AuthError::Expired);
        }
        let name = match claims.get(&s.name_claim) {
            Some(Value::String(n)) => clean_name(n, max_name_chars).unwrap_or_else(|| sub.clone()),
            _ => sub.clone(),
        };
        // Present, the claim restricts; malformed, it must not read as "no restriction".
        let rooms = match claims.get(&s.rooms_claim) {
            None => None,
            Some(Value::String(one)) => Some(vec![one.clone()].into()),
            Some(Value::Array(list)) => Some(
                list.iter()
                    .map(|v| v.as_str().map(str::to_string))
                    .collect::<Option<Vec<_>>>()
                    .ok_or_else(|| invalid_claim(&s.rooms_claim, ROOMS_CLAIM))?
                    .into(),
            ),
            Some(_) => return Err(invalid_claim(&s.rooms_claim, ROOMS_CLAIM)),
        };
        let admin = match claims.get(&s.admin_claim) {
            Some(Value::String(v)) => *v == s.admin_value,
            Some(Value::Array(vs)) => vs.iter().any(|v| v.as_str() == Some(s.admin_value.as_str())),
            Some(Value::Bool(b)) => *b && s.admin_value == "true",
            _ => false,
        };
        Ok((Arc::from(sub), Profile { username: Arc::from(name), admin, rooms, expires_at: Some(expires_at) }))
    }

    /// Whether a user may join, publish to, or read the history of `room`.
    pub fn may_enter(&self, profile: &Profile, room: &RoomName) -> bool {
        let room = room.as_str();
        let private = self.settings.private_room_prefixes.iter().any(|p| room.starts_with(p.as_str()));
        match &profile.rooms {
            Some(patterns) => patterns.iter().any(|p| glob(p, room)),
            None => !private,
        }
    }
}

const ROOMS_CLAIM: &str = "a room pattern or an array of them";

fn invalid_claim(claim: &str, expected: &'static str) -> AuthError {
    AuthError::InvalidClaim { claim: claim.to_string(), expected }
}

/// The one expiry rule, for a token being checked and for a connection living on it: past
/// `exp` by more than the clock-skew `leeway` (all in Unix seconds).
pub fn expired(exp: u64, now: u64, leeway: u64) -> bool {
    now > exp.saturating_add(leeway)
}

/// A display name a person chose: trimmed, control characters removed, 1 to `max`
/// characters; markup is cleaned later with every other free text.
pub fn clean_name(name: &str, max: usize) -> Option<String> {
    let name: String = name.chars().filter(|c| !c.is_control()).collect();
    let name = name.trim();
    (!name.is_empty() && name.chars().count() <= max).then(|| name.to_string())
}

fn decoding_key(s: &AuthSettings) -> Result<(DecodingKey, Validation), ConfigError> {
    let invalid = |key: &'static str, reason: String| ConfigError::Invalid { key, reason };
    let alg: Algorithm = s.algorithm.parse().map_err(|_| invalid("auth.algorithm", "unknown algorithm".into()))?;
    let key = if s.algorithm.starts_with("HS") {
        DecodingKey::from_secret(s.secret.as_bytes())
    } else {
        let pem = std::fs::read(&s.public_key_file)
            .map_err(|e| invalid("auth.public_key_file", format!("{}: {e}", s.public_key_file.display())))?;
        let parsed = match alg {
            Algorithm::ES256 | Algorithm::ES384 => DecodingKey::from_ec_pem(&pem),
            Algorithm::EdDSA => DecodingKey::from_ed_pem(&pem),
            _ => DecodingKey::from_rsa_pem(&pem),
        };
        parsed.map_err(|e| invalid("auth.public_key_file", format!("not a {} public key: {e}", s.algorithm)))?
    };
    let mut validation = Validation::new(alg);
    validation.leeway = s.leeway_seconds;
    validation.validate_nbf = true;
    // `exp` and `sub` are checked in `verify`. jsonwebtoken only compares `aud` and `iss`
    // when the token has them: configured, they are required too.
    validation.validate_exp = false;
    let mut required = Vec::new();
    if s.audience.is_empty() {
        validation.validate_aud = false;
    } else {
        validation.set_audience(&s.audience);
        required.push("aud");
    }
    if !s.issuer.is_empty() {
        validation.set_issuer(&s.issuer);
        required.push("iss");
    }
    validation.set_required_spec_claims(&required);
    Ok((key, validation))
}

/// `*` matches any run of characters (including none); everything else matches itself.
fn glob(pattern: &str, text: &str) -> bool {
    let (p, t) = (pattern.as_bytes(), text.as_bytes());
    let (mut pi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && p[pi] == b'*' {
            star = Some((pi, ti));
            pi += 1;
        } else if pi < p.len() && p[pi] == t[ti] {
            pi += 1;
            ti += 1;
        } else if let Some((sp, st)) = star {
            pi = sp + 1;
            ti = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == b'*')
}

pub fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                match u8::from_str_radix(std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("zz"), 16) {
                    Ok(b) => {
                        out.push(b);
                        i += 3;
                        continue;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Whether two secrets are equal, in time that depends on their lengths only, so that
/// timing a refusal tells nothing about how much of a guessed key was right.
pub fn same_secret(given: &[u8], expected: &[u8]) -> bool {
    if given.len() != expected.len() {
        return false;
    }
    given.iter().zip(expected).fold(0u8, |diff, (a, b)| diff | (a ^ b)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        assert!(glob("game-*", "game-1"));
        assert!(glob("game-*", "game-"));
        assert!(!glob("game-*", "gam"));
        assert!(glob("*", "anything"));
        assert!(glob("a*b*c", "axxbyyc"));
        assert!(!glob("a*b*c", "axxbyy"));
        assert!(glob("lobby", "lobby"));
        assert!(!glob("lobby", "lobby2"));
    }

    #[test]
    fn expiry_tolerates_the_leeway_and_no_more() {
        assert!(!expired(100, 100, 0));
        assert!(expired(100, 101, 0));
        assert!(!expired(100, 130, 30));
        assert!(expired(100, 131, 30));
        assert!(!expired(u64::MAX, u64::MAX, 30));
    }

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode("a%2Eb"), "a.b");
        assert_eq!(percent_decode("abc"), "abc");
        assert_eq!(percent_decode("50%"), "50%");
    }

    #[test]
    fn names() {
        assert_eq!(clean_name("  alice\u{7} ", 32).as_deref(), Some("alice"));
        assert_eq!(clean_name("   ", 32), None);
        assert_eq!(clean_name("abcd", 3), None);
    }
}
