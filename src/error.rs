//! Errors that reach a client.
//!
//! Every refusal a client can provoke is a variant here with a stable snake_case `code`,
//! so the wire format of errors is decided in one place and documented in
//! `docs/protocol.md`. The connection stays open after any of these; only the frame that
//! caused it is discarded. How an error is written on the wire is the protocol's business
//! (`protocol`), so this module depends on nothing.

#[derive(Debug, Clone, thiserror::Error)]
pub enum ClientError {
    #[error("Invalid JSON: {0}")]
    InvalidJson(String),
    #[error("A message must be a JSON object")]
    NotAnObject,
    #[error("A message needs a string field \"type\"")]
    MissingType,
    #[error("Unknown event type \"{0}\"")]
    UnknownType(String),
    #[error("Binary frames are not supported; send JSON text")]
    BinaryFrame,
    #[error("Invalid room name: use 1 to 64 letters, digits, '_', '-', '.' or ':'")]
    InvalidRoom,
    #[error("Field \"{field}\" {problem}")]
    InvalidField { field: &'static str, problem: &'static str },
    #[error("You are not in room \"{0}\"")]
    NotInRoom(String),
    #[error("The server is busy; try again shortly")]
    Busy,
    #[error("The plugin handling \"{0}\" failed")]
    PluginError(String),
    #[error("You may not do that in room \"{0}\"")]
    Forbidden(String),
    #[error("{0}")]
    NotAllowed(&'static str),
    #[error("Message too long")]
    MessageTooLong,
    #[error("Message is empty once cleaned")]
    EmptyMessage,
    #[error("Too many events; slow down")]
    RateLimited { retry_after_ms: u64 },
    #[error("Message nested deeper than {0} levels")]
    TooDeep(usize),
    #[error("You are in too many rooms (at most {0})")]
    TooManyRooms(usize),
    #[error("Room \"{0}\" is full")]
    RoomFull(String),
    #[error("Token refused: {0}")]
    InvalidToken(String),
    #[error("Invalid name: 1 to {0} characters, no control characters")]
    InvalidName(usize),
    /// A plugin refused the event with its own code (e.g. `not_your_turn`).
    #[error("{message}")]
    Rejected { code: String, message: String },
}

impl ClientError {
    pub fn code(&self) -> &str {
        match self {
            ClientError::InvalidJson(_) => "invalid_json",
            ClientError::NotAnObject => "not_an_object",
            ClientError::MissingType => "missing_type",
            ClientError::UnknownType(_) => "unknown_type",
            ClientError::BinaryFrame => "binary_not_supported",
            ClientError::InvalidRoom => "invalid_room",
            ClientError::InvalidField { .. } => "invalid_field",
            ClientError::NotInRoom(_) => "not_in_room",
            ClientError::Busy => "busy",
            ClientError::PluginError(_) => "plugin_error",
            ClientError::Forbidden(_) | ClientError::NotAllowed(_) => "forbidden",
            ClientError::MessageTooLong => "message_too_long",
            ClientError::EmptyMessage => "empty_message",
            ClientError::RateLimited { .. } => "rate_limited",
            ClientError::TooDeep(_) => "too_deep",
            ClientError::TooManyRooms(_) => "too_many_rooms",
            ClientError::RoomFull(_) => "room_full",
            ClientError::InvalidToken(_) => "invalid_token",
            ClientError::InvalidName(_) => "invalid_name",
            ClientError::Rejected { code, .. } => code,
        }
    }

    /// An unknown type is echoed back; cap it so a client cannot make us echo 64 KiB.
    pub fn unknown_type(kind: &str) -> ClientError {
        let mut shown: String = kind.chars().take(64).collect();
        if shown.len() < kind.len() {
            shown.push('…');
        }
        ClientError::UnknownType(shown)
    }
}
