//! Configuration: the typed settings every other module reads, and the one place they are
//! loaded and checked.
//!
//! Settings come in layers (embedded `config/default.toml`, then an optional file, then
//! `RTGATE__SECTION__KEY` environment variables) so that the binary runs with no set-up
//! and an operator can still change any key without a file. Every key is known here:
//! unknown keys and invalid values are start-up errors that name the key, because a typo
//! silently ignored is worse than a refusal to start.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use config::{Config, File, FileFormat, ValueKind};
use serde::{Deserialize, Deserializer};

/// The embedded defaults; also the documentation of every key.
pub const DEFAULT_TOML: &str = include_str!("../config/default.toml");

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("configuration: {0}")]
    Load(#[from] config::ConfigError),
    #[error("configuration key `{key}`: {reason}")]
    Invalid { key: &'static str, reason: String },
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    pub server: ServerSettings,
    pub log: LogSettings,
    pub plugins: PluginSettings,
    pub heartbeat: HeartbeatSettings,
    pub limits: LimitSettings,
    pub history: HistorySettings,
    pub auth: AuthSettings,
    pub sanitize: SanitizeSettings,
    pub rate_limits: RateLimitSettings,
    pub metrics: MetricsSettings,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerSettings {
    pub bind: SocketAddr,
    pub allowed_origins: Vec<String>,
    pub allow_missing_origin: bool,
    #[serde(deserialize_with = "duration")]
    pub shutdown_grace: Duration,
    #[serde(deserialize_with = "duration")]
    pub header_timeout: Duration,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsSettings {
    #[serde(deserialize_with = "metrics_listen")]
    pub listen: MetricsListen,
    pub key: String,
}

/// Where `GET /metrics` is served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricsListen {
    /// On the gateway's own address.
    Main,
    /// On a listener of its own (the gateway's address then serves no `/metrics`).
    Separate(SocketAddr),
    /// Nowhere.
    Off,
}

fn metrics_listen<'de, D: Deserializer<'de>>(d: D) -> Result<MetricsListen, D::Error> {
    let text = String::deserialize(d)?;
    match text.as_str() {
        "main" => Ok(MetricsListen::Main),
        "off" => Ok(MetricsListen::Off),
        addr => addr.parse().map(MetricsListen::Separate).map_err(|_| {
            serde::de::Error::custom(format!("`{text}` is not \"main\", \"off\" or an address such as 127.0.0.1:9464"))
        }),
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogSettings {
    pub filter: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PluginSettings {
    pub dir: PathBuf,
    pub queue: usize,
    #[serde(deserialize_with = "duration")]
    pub time_budget: Duration,
    pub memory_limit_mb: usize,
    pub hot_reload: bool,
    #[serde(deserialize_with = "duration")]
    pub reload_debounce: std::time::Duration,
    /// `[plugins.settings.<plugin>]`: free-form tables handed to each script as
    /// `rtgate.config`.
    #[serde(default)]
    pub settings: std::collections::HashMap<String, serde_json::Value>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeartbeatSettings {
    #[serde(deserialize_with = "duration")]
    pub interval: Duration,
    #[serde(deserialize_with = "duration")]
    pub timeout: Duration,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HistorySettings {
    pub enabled: bool,
    pub path: PathBuf,
    pub durability: Durability,
    pub synchronous: Synchronous,
    pub batch_max: usize,
    #[serde(deserialize_with = "duration")]
    pub batch_delay: Duration,
    pub queue: usize,
    pub recent: usize,
    pub max_catchup: u32,
    pub page_limit: u32,
    pub page_limit_max: u32,
    pub max_per_room: u64,
    #[serde(deserialize_with = "duration")]
    pub max_age: Duration,
    #[serde(deserialize_with = "duration")]
    pub retention_interval: Duration,
    pub max_db_bytes: u64,
    #[serde(deserialize_with = "duration")]
    pub retry_interval: Duration,
    #[serde(deserialize_with = "duration")]
    pub unload_after: Duration,
}

/// When a persisted message is delivered relative to its commit (see docs/history.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Durability {
    /// Delivered once its batch is committed: nothing delivered is lost to a crash.
    PerMessage,
    /// Delivered at once, committed within `batch_delay` plus a commit: a crash can lose
    /// what was delivered in that window.
    Batched,
}

/// SQLite's `synchronous`: `normal` survives a process crash, `full` also a power loss.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Synchronous {
    Normal,
    Full,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitSettings {
    pub max_frame_bytes: usize,
    pub outbox_messages: usize,
    pub outbox_bytes: usize,
    pub max_json_depth: usize,
    pub max_message_chars: usize,
    pub max_name_chars: usize,
    pub max_rooms_per_connection: usize,
    pub max_members_per_room: usize,
    pub max_connections_per_ip: usize,
    pub new_connections_per_ip_per_second: u32,
    /// `None` ("auto"): allowed in anonymous mode only; see [`Settings::global_chat_allowed`].
    #[serde(deserialize_with = "bool_or_auto")]
    pub allow_global_chat: Option<bool>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AuthMode {
    Anonymous,
    Jwt,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthSettings {
    pub mode: AuthMode,
    pub algorithm: String,
    pub secret: String,
    pub public_key_file: PathBuf,
    pub audience: Vec<String>,
    pub issuer: Vec<String>,
    pub leeway_seconds: u64,
    pub name_claim: String,
    pub rooms_claim: String,
    pub admin_claim: String,
    pub admin_value: String,
    pub private_room_prefixes: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SanitizeSettings {
    pub allowed_tags: Vec<String>,
    pub url_schemes: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitSettings {
    pub enabled: bool,
    pub disconnect_after: u32,
    pub buckets: std::collections::BTreeMap<String, Bucket>,
    #[serde(default)]
    pub events: std::collections::BTreeMap<String, String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Bucket {
    pub per_minute: u32,
    pub burst: u32,
}

/// `true`, `false` or `"auto"` (`None`); from the environment, the same words as text.
fn bool_or_auto<'de, D: Deserializer<'de>>(d: D) -> Result<Option<bool>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Bool(bool),
        Text(String),
    }
    match Raw::deserialize(d)? {
        Raw::Bool(b) => Ok(Some(b)),
        Raw::Text(t) => match t.to_ascii_lowercase().as_str() {
            "auto" => Ok(None),
            "true" => Ok(Some(true)),
            "false" => Ok(Some(false)),
            _ => Err(serde::de::Error::custom(format!("`{t}` is not true, false or \"auto\""))),
        },
    }
}

/// The layers merged, before they are read into [`Settings`].
fn layered(file: Option<&Path>, vars: Vec<(String, String)>) -> Result<Config, ConfigError> {
    let defaults = File::from_str(DEFAULT_TOML, FileFormat::Toml);
    let mut builder = Config::builder().add_source(defaults.clone());
    if let Some(path) = file {
        builder = builder.add_source(File::from(path).format(FileFormat::Toml));
    }
    if !vars.is_empty() {
        let defaults = Config::builder().add_source(defaults).build()?;
        for (key, value) in vars {
            let default = defaults.get::<config::Value>(&key).ok().map(|v| v.kind);
            builder = builder.set_override(&key, env_value(default, value))?;
        }
    }
    Ok(builder.build()?)
}

/// The `RTGATE__SECTION__KEY` variables (any case), as `(section.key, value)`.
fn environment() -> Result<Vec<(String, String)>, ConfigError> {
    let mut vars = Vec::new();
    for (name, value) in std::env::vars_os() {
        let Some(name) = name.to_str().map(str::to_ascii_lowercase) else { continue };
        let Some(key) = name.strip_prefix("rtgate__") else { continue };
        let value = value.into_string().map_err(|_| {
            ConfigError::Load(config::ConfigError::Message(format!("{} is not valid UTF-8", name.to_uppercase())))
        })?;
        vars.push((key.replace("__", "."), value));
    }
    Ok(vars)
}

/// An environment variable's text, typed by the key's embedded default: a list is split at
/// commas, a string stays exactly the text given (a secret of digits is not a number), and
/// anything else (numbers, booleans, plugin settings the defaults lack) is read as a
/// boolean or number when it is one.
fn env_value(default: Option<ValueKind>, text: String) -> config::Value {
    let origin = Some("the environment".to_string());
    let kind = match default {
        Some(ValueKind::Array(_)) => ValueKind::Array(
            text.split(',')
                .map(str::trim)
                .filter(|item| !item.is_empty())
                .map(|item| config::Value::new(origin.as_ref(), item))
                .collect(),
        ),
        Some(ValueKind::String(_)) => ValueKind::String(text),
        _ => {
            if let Ok(b) = text.to_ascii_lowercase().parse::<bool>() {
                ValueKind::Boolean(b)
            } else if let Ok(i) = text.parse::<i64>() {
                ValueKind::I64(i)
            } else if let Some(f) = text.parse::<f64>().ok().filter(|f| f.is_finite()) {
                ValueKind::Float(f)
            } else {
                ValueKind::String(text)
            }
        }
    };
    config::Value::new(origin.as_ref(), kind)
}

fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let text = String::deserialize(d)?;
    humantime::parse_duration(&text).map_err(|e| serde::de::Error::custom(format!("`{text}` is not a duration ({e})")))
}

impl Settings {
    /// The embedded defaults alone: what `cargo run` and the tests start from.
    pub fn defaults() -> Settings {
        // The embedded file is part of the binary and covered by tests; it cannot fail.
        Self::load(None, false).expect("embedded config/default.toml is valid")
    }

    /// Defaults, then `file` if given, then (when `env` is set) `RTGATE__*` variables.
    pub fn load(file: Option<&Path>, env: bool) -> Result<Settings, ConfigError> {
        let vars = if env { environment()? } else { Vec::new() };
        Self::load_from(file, vars)
    }

    /// `load` with the environment given as `(name, value)` pairs.
    pub fn load_from(file: Option<&Path>, vars: Vec<(String, String)>) -> Result<Settings, ConfigError> {
        let settings: Settings = layered(file, vars)?.try_deserialize()?;
        settings.validate()?;
        Ok(settings)
    }

    /// Whether users without the admin role may send a chat message to everyone connected
    /// (`limits.allow_global_chat`; "auto" allows it to anonymous guests only, as the seed
    /// did, because with tokens addressing everyone is otherwise an admin's right).
    pub fn global_chat_allowed(&self) -> bool {
        self.limits.allow_global_chat.unwrap_or(self.auth.mode == AuthMode::Anonymous)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        fn check(ok: bool, key: &'static str, reason: &str) -> Result<(), ConfigError> {
            if ok { Ok(()) } else { Err(ConfigError::Invalid { key, reason: reason.to_string() }) }
        }
        check(!self.server.header_timeout.is_zero(), "server.header_timeout", "must be greater than zero")?;
        let hb = &self.heartbeat;
        check(!hb.interval.is_zero(), "heartbeat.interval", "must be greater than zero")?;
        check(hb.timeout > hb.interval, "heartbeat.timeout", "must be longer than heartbeat.interval")?;
        check(
            (128..=16 << 20).contains(&self.limits.max_frame_bytes),
            "limits.max_frame_bytes",
            "must be between 128 and 16777216",
        )?;
        check(self.limits.outbox_messages >= 16, "limits.outbox_messages", "must be at least 16")?;
        check(
            self.limits.outbox_bytes >= self.limits.max_frame_bytes,
            "limits.outbox_bytes",
            "must be at least limits.max_frame_bytes",
        )?;
        check(self.plugins.queue >= 1, "plugins.queue", "must be at least 1")?;
        let h = &self.history;
        check(!h.path.as_os_str().is_empty(), "history.path", "must not be empty")?;
        check((1..=100_000).contains(&h.batch_max), "history.batch_max", "must be between 1 and 100000")?;
        check(h.queue >= h.batch_max, "history.queue", "must be at least history.batch_max")?;
        check(h.recent >= 1, "history.recent", "must be at least 1")?;
        check(h.page_limit >= 1, "history.page_limit", "must be at least 1")?;
        check(h.page_limit_max >= h.page_limit, "history.page_limit_max", "must be at least history.page_limit")?;
        check(h.max_catchup >= 1, "history.max_catchup", "must be at least 1")?;
        check(!h.retention_interval.is_zero(), "history.retention_interval", "must be greater than zero")?;
        check(!h.retry_interval.is_zero(), "history.retry_interval", "must be greater than zero")?;
        check(!h.unload_after.is_zero(), "history.unload_after", "must be greater than zero")?;
        check(
            h.max_db_bytes == 0 || h.max_db_bytes >= 1 << 20,
            "history.max_db_bytes",
            "must be 0 (no limit) or at least 1048576",
        )?;
        check(!self.plugins.time_budget.is_zero(), "plugins.time_budget", "must be greater than zero")?;
        check(
            (1..=4096).contains(&self.plugins.memory_limit_mb),
            "plugins.memory_limit_mb",
            "must be between 1 and 4096",
        )?;
        let l = &self.limits;
        check((2..=128).contains(&l.max_json_depth), "limits.max_json_depth", "must be between 2 and 128")?;
        check(l.max_message_chars >= 1, "limits.max_message_chars", "must be at least 1")?;
        check(l.max_name_chars >= 1, "limits.max_name_chars", "must be at least 1")?;
        check(l.max_rooms_per_connection >= 1, "limits.max_rooms_per_connection", "must be at least 1")?;
        check(l.max_members_per_room >= 1, "limits.max_members_per_room", "must be at least 1")?;
        check(l.max_connections_per_ip >= 1, "limits.max_connections_per_ip", "must be at least 1")?;
        check(
            l.new_connections_per_ip_per_second >= 1,
            "limits.new_connections_per_ip_per_second",
            "must be at least 1",
        )?;
        let r = &self.rate_limits;
        check(r.buckets.contains_key("default"), "rate_limits.buckets", "must define a \"default\" bucket")?;
        for b in r.buckets.values() {
            check(b.per_minute >= 1 && b.burst >= 1, "rate_limits.buckets", "per_minute and burst must be at least 1")?;
        }
        for bucket in r.events.values() {
            check(r.buckets.contains_key(bucket), "rate_limits.events", "names a bucket that is not defined")?;
        }
        check(r.disconnect_after >= 1, "rate_limits.disconnect_after", "must be at least 1")?;
        let a = &self.auth;
        if a.mode == AuthMode::Jwt {
            let hmac = a.algorithm.starts_with("HS");
            check(
                [
                    "HS256", "HS384", "HS512", "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384",
                    "EdDSA",
                ]
                .contains(&a.algorithm.as_str()),
                "auth.algorithm",
                "must be one of HS256/384/512, RS256/384/512, PS256/384/512, ES256, ES384, EdDSA",
            )?;
            check(!hmac || a.secret.len() >= 32, "auth.secret", "must be at least 32 bytes for an HMAC algorithm")?;
            check(
                hmac || !a.public_key_file.as_os_str().is_empty(),
                "auth.public_key_file",
                "is required for this algorithm",
            )?;
        }
        for origin in &self.server.allowed_origins {
            check(
                origin == "*" || origin.starts_with("http://") || origin.starts_with("https://"),
                "server.allowed_origins",
                "each entry must be \"*\" or start with http:// or https://",
            )?;
        }
        tracing_subscriber::EnvFilter::try_new(&self.log.filter)
            .map_err(|e| ConfigError::Invalid { key: "log.filter", reason: e.to_string() })?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every key whose embedded default is a list.
    fn list_keys() -> Vec<String> {
        fn walk(prefix: &str, table: config::Map<String, config::Value>, out: &mut Vec<String>) {
            for (name, value) in table {
                let key = if prefix.is_empty() { name } else { format!("{prefix}.{name}") };
                match value.kind {
                    ValueKind::Table(table) => walk(&key, table, out),
                    ValueKind::Array(_) => out.push(key),
                    _ => {}
                }
            }
        }
        let mut keys = Vec::new();
        walk("", layered(None, Vec::new()).unwrap().try_deserialize().unwrap(), &mut keys);
        keys
    }

    #[test]
    fn every_list_key_reads_a_comma_separated_environment_value() {
        let keys = list_keys();
        assert!(keys.len() >= 6, "{keys:?}");
        let value = "https://a.example, https://b.example,";
        let vars: Vec<(String, String)> = keys.iter().map(|k| (k.clone(), value.to_string())).collect();
        let merged = layered(None, vars.clone()).unwrap();
        for key in &keys {
            assert_eq!(merged.get::<Vec<String>>(key).unwrap(), ["https://a.example", "https://b.example"], "{key}");
        }
        let s = Settings::load_from(None, vars).unwrap();
        assert_eq!(s.auth.audience, ["https://a.example", "https://b.example"]);
        // An empty value is an empty list.
        let s = Settings::load_from(None, vec![("auth.private_room_prefixes".into(), String::new())]).unwrap();
        assert!(s.auth.private_room_prefixes.is_empty());
    }

    #[test]
    fn environment_strings_stay_strings_and_numbers_stay_numbers() {
        let digits = "123456789012345678901234567890123";
        let s = Settings::load_from(
            None,
            vec![
                ("auth.secret".into(), digits.into()),
                ("auth.name_claim".into(), "true".into()),
                ("log.filter".into(), "0042".into()),
                ("limits.max_frame_bytes".into(), "4096".into()),
                ("history.enabled".into(), "false".into()),
                ("plugins.settings.typing.timeout_ms".into(), "250".into()),
                ("plugins.settings.extra.ratio".into(), "0.5".into()),
                ("limits.allow_global_chat".into(), "false".into()),
            ],
        )
        .unwrap();
        assert_eq!(s.auth.secret, digits);
        assert_eq!(s.auth.name_claim, "true");
        assert_eq!(s.log.filter, "0042");
        assert_eq!(s.limits.max_frame_bytes, 4096);
        assert!(!s.history.enabled);
        assert_eq!(s.plugins.settings["typing"]["timeout_ms"], serde_json::json!(250));
        assert_eq!(s.plugins.settings["extra"]["ratio"], serde_json::json!(0.5));
        assert_eq!(s.limits.allow_global_chat, Some(false));
    }

    #[test]
    fn global_chat_is_for_guests_unless_configured() {
        let mut s = Settings::defaults();
        assert_eq!(s.limits.allow_global_chat, None);
        assert!(s.global_chat_allowed());
        s.auth.mode = AuthMode::Jwt;
        assert!(!s.global_chat_allowed());
        s.limits.allow_global_chat = Some(true);
        assert!(s.global_chat_allowed());
        let bad = Settings::load_from(None, vec![("limits.allow_global_chat".into(), "sometimes".into())]);
        assert!(bad.unwrap_err().to_string().contains("limits.allow_global_chat"));
    }
}
