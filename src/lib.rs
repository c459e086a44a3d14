//! rtgate: a real-time WebSocket gateway. Clients join rooms and exchange events; every
//! event type the core does not own is handled by a sandboxed Lua plugin.
//!
//! The map of the modules and of how one event flows through them is in
//! `ARCHITECTURE.md`; the wire protocol is in `docs/protocol.md`.

pub mod auth;
pub mod clock;
pub mod config;
pub mod conn;
pub mod error;
pub mod gateway;
pub mod history;
pub mod http;
pub mod hub;
pub mod listener;
pub mod metrics;
pub mod plugins;
pub mod protocol;
pub mod ratelimit;
pub mod sanitize;
pub mod session;

pub use config::Settings;
pub use gateway::{Running, start};
