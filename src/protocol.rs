//! The wire protocol: what a client may send, parsed in one place, and the messages the
//! core itself sends.
//!
//! A text frame carries one JSON object with a string `type`. The core understands only
//! room membership (`join_room`, `leave_room`); every other type is handed, still as a
//! JSON object, to the Lua plugin registered for it. Keeping the core's vocabulary this
//! small is what lets operators add event types without touching Rust. The server's own
//! messages are the seed's (`welcome`, `room_joined`, `user_joined`, `user_left`, `error`)
//! with the same field names, so a client written for the seed works unchanged.

use std::fmt;
use std::sync::Arc;

use serde::Serialize;
use serde_json::{Map, Value};
use tokio_tungstenite::tungstenite::Message;

use crate::error::ClientError;

/// One WebSocket message as queued for a client. Text frames wrap reference-counted bytes,
/// so a frame serialized once is shared by every subscriber it is delivered to.
pub type Frame = Message;

/// A validated room name: 1 to 64 of ASCII letters, digits, `_`, `-`, `.`, `:`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RoomName(Arc<str>);

impl RoomName {
    pub fn parse(s: &str) -> Result<RoomName, ClientError> {
        let ok = (1..=64).contains(&s.len())
            && s.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b':'));
        if ok { Ok(RoomName(Arc::from(s))) } else { Err(ClientError::InvalidRoom) }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn as_arc(&self) -> Arc<str> {
        self.0.clone()
    }
}

impl fmt::Display for RoomName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for RoomName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl Serialize for RoomName {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

/// Everything a client can send, decided here and nowhere else.
#[derive(Debug)]
pub enum ClientEvent {
    /// `since`: the last sequence number the client saw in this room (catch-up).
    JoinRoom {
        room: RoomName,
        since: Option<u64>,
    },
    LeaveRoom {
        room: RoomName,
    },
    /// Replaces the connection's token (jwt mode) before it expires.
    Refresh {
        token: String,
    },
    /// A guest's display name.
    SetName {
        name: String,
    },
    /// Any other type: routed to the plugin registered for `kind`, with the whole object.
    Plugin {
        kind: String,
        body: Map<String, Value>,
    },
}

impl ClientEvent {
    /// Parses one text frame. `max_depth` bounds nesting (serde_json alone stops at 128).
    pub fn parse(text: &str, max_depth: usize) -> Result<ClientEvent, ClientError> {
        let value: Value = serde_json::from_str(text).map_err(|e| ClientError::InvalidJson(e.to_string()))?;
        if depth(&value) > max_depth {
            return Err(ClientError::TooDeep(max_depth));
        }
        let Value::Object(body) = value else {
            return Err(ClientError::NotAnObject);
        };
        let kind = match body.get("type") {
            Some(Value::String(kind)) => kind.as_str(),
            _ => return Err(ClientError::MissingType),
        };
        match kind {
            "join_room" => Ok(ClientEvent::JoinRoom { room: room_field(&body)?, since: since_field(&body)? }),
            "leave_room" => Ok(ClientEvent::LeaveRoom { room: room_field(&body)? }),
            "refresh" => Ok(ClientEvent::Refresh { token: string_field(&body, "token")? }),
            "set_name" => Ok(ClientEvent::SetName { name: string_field(&body, "name")? }),
            _ => Ok(ClientEvent::Plugin { kind: kind.to_string(), body }),
        }
    }
}

/// Nesting depth of a JSON value (a scalar is 0, `[]` is 1).
fn depth(v: &Value) -> usize {
    match v {
        Value::Array(items) => 1 + items.iter().map(depth).max().unwrap_or(0),
        Value::Object(map) => 1 + map.values().map(depth).max().unwrap_or(0),
        _ => 0,
    }
}

fn string_field(body: &Map<String, Value>, field: &'static str) -> Result<String, ClientError> {
    match body.get(field) {
        Some(Value::String(s)) => Ok(s.clone()),
        _ => Err(ClientError::InvalidField { field, problem: "must be a string" }),
    }
}

fn since_field(body: &Map<String, Value>) -> Result<Option<u64>, ClientError> {
    match body.get("since") {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_u64()
            .map(Some)
            .ok_or(ClientError::InvalidField { field: "since", problem: "must be a non-negative integer" }),
    }
}

fn room_field(body: &Map<String, Value>) -> Result<RoomName, ClientError> {
    match body.get("room") {
        Some(Value::String(room)) => RoomName::parse(room),
        _ => Err(ClientError::InvalidRoom),
    }
}

/// Serializes a server message once into a shareable text frame.
pub fn frame<T: Serialize + ?Sized>(msg: &T) -> Frame {
    // Serializing our own plain structs (strings, numbers, arrays) cannot fail.
    let text = serde_json::to_string(msg).unwrap_or_else(|_| "{}".to_string());
    Message::text(text)
}

impl ClientError {
    /// `{"type":"error","code":..,"message":..}` (with `retryAfterMs` when rate limited),
    /// serialized once.
    pub fn to_frame(&self) -> Frame {
        match self {
            ClientError::RateLimited { retry_after_ms } => {
                rate_limited_frame(self.code(), &self.to_string(), *retry_after_ms)
            }
            _ => error_frame(self.code(), &self.to_string()),
        }
    }
}

pub fn error_frame(code: &str, message: &str) -> Frame {
    #[derive(Serialize)]
    struct Error<'a> {
        r#type: &'static str,
        code: &'a str,
        message: &'a str,
    }
    frame(&Error { r#type: "error", code, message })
}

fn rate_limited_frame(code: &str, message: &str, retry_after_ms: u64) -> Frame {
    #[derive(Serialize)]
    #[serde(rename_all = "camelCase")]
    struct Limited<'a> {
        r#type: &'static str,
        code: &'a str,
        message: &'a str,
        retry_after_ms: u64,
    }
    frame(&Limited { r#type: "error", code, message, retry_after_ms })
}

pub fn token_refreshed(expires_at: Option<u64>) -> Frame {
    #[derive(Serialize)]
    #[serde(rename_all = "camelCase")]
    struct Refreshed {
        r#type: &'static str,
        expires_at: Option<u64>,
    }
    frame(&Refreshed { r#type: "token_refreshed", expires_at })
}

/// Tells a client the gateway took it out of `room`; `reason` is an error code
/// (`forbidden`: a refreshed token no longer allows the room).
pub fn room_left(room: &RoomName, reason: &str, message: &str) -> Frame {
    #[derive(Serialize)]
    struct RoomLeft<'a> {
        r#type: &'static str,
        room: &'a RoomName,
        reason: &'a str,
        message: &'a str,
    }
    frame(&RoomLeft { r#type: "room_left", room, reason, message })
}

pub fn name_set(username: &str) -> Frame {
    #[derive(Serialize)]
    struct NameSet<'a> {
        r#type: &'static str,
        username: &'a str,
    }
    frame(&NameSet { r#type: "name_set", username })
}

pub fn welcome(client_id: &str, user_id: &str, username: &str) -> Frame {
    #[derive(Serialize)]
    #[serde(rename_all = "camelCase")]
    struct Welcome<'a> {
        r#type: &'static str,
        client_id: &'a str,
        message: &'static str,
        user_id: &'a str,
        username: &'a str,
    }
    frame(&Welcome { r#type: "welcome", client_id, message: "Connected to WebSocket server", user_id, username })
}

/// `seq`: the room's last delivered sequence number, when it has history.
pub fn room_joined(room: &RoomName, members: &[&str], seq: Option<u64>) -> Frame {
    #[derive(Serialize)]
    struct RoomJoined<'a> {
        r#type: &'static str,
        room: &'a RoomName,
        members: &'a [&'a str],
        #[serde(skip_serializing_if = "Option::is_none")]
        seq: Option<u64>,
    }
    frame(&RoomJoined { r#type: "room_joined", room, members, seq })
}

/// Tells a joiner that messages after `after` (and before `before`, when known) cannot be
/// replayed on this connection: expired, too many, or history unavailable.
pub fn history_gap(room: &RoomName, after: u64, before: Option<u64>) -> Frame {
    #[derive(Serialize)]
    struct Gap<'a> {
        r#type: &'static str,
        room: &'a RoomName,
        after: u64,
        before: Option<u64>,
    }
    frame(&Gap { r#type: "history_gap", room, after, before })
}

/// `user_joined` / `user_left`, with the seed's human-readable `message`.
pub fn presence(joined: bool, client_id: &str, user_id: &str, username: &str, room: &RoomName) -> Frame {
    #[derive(Serialize)]
    #[serde(rename_all = "camelCase")]
    struct Presence<'a> {
        r#type: &'static str,
        client_id: &'a str,
        room: &'a RoomName,
        message: String,
        user_id: &'a str,
        username: &'a str,
    }
    let (kind, verb) = if joined { ("user_joined", "joined") } else { ("user_left", "left") };
    frame(&Presence {
        r#type: kind,
        client_id,
        room,
        message: format!("User {client_id} {verb} the room"),
        user_id,
        username,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn room_names() {
        assert!(RoomName::parse("general").is_ok());
        assert!(RoomName::parse("game-1:a_b.c").is_ok());
        assert!(RoomName::parse(&"a".repeat(64)).is_ok());
        assert!(RoomName::parse(&"a".repeat(65)).is_err());
        assert!(RoomName::parse("").is_err());
        assert!(RoomName::parse("a b").is_err());
        assert!(RoomName::parse("é").is_err());
        assert!(RoomName::parse("../x").is_err());
    }

    #[test]
    fn parse_errors_have_codes() {
        let code = |s: &str| ClientEvent::parse(s, 32).unwrap_err().code().to_string();
        assert_eq!(code("{"), "invalid_json");
        assert_eq!(code("[1]"), "not_an_object");
        assert_eq!(code("{\"type\":1}"), "missing_type");
        assert_eq!(code("{}"), "missing_type");
        assert_eq!(code("{\"type\":\"join_room\",\"room\":\"a b\"}"), "invalid_room");
        assert_eq!(code("{\"type\":\"join_room\"}"), "invalid_room");
        assert_eq!(code(&format!("{}{}", "[".repeat(40), "]".repeat(40))), "too_deep");
        assert_eq!(code("{\"type\":\"refresh\"}"), "invalid_field");
    }
}
