//! The host API a plugin script sees: the global `rtgate` table, and the sandbox around it.
//!
//! Every function here is synchronous and non-blocking: sending means pushing a frame
//! serialized once into bounded outboxes, so a script can never make the gateway wait on a
//! socket. Scripts get nothing else from the host: no files, no processes, no `require`,
//! no bytecode loading; see `docs/plugins.md` for the contract and `sandbox` for the list.

use std::collections::{BinaryHeap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use mlua::chunk::ChunkMode;
use mlua::{Function, Lua, LuaSerdeExt, StdLib, Table, Value};
use parking_lot::Mutex;

use super::{Host, Outlet, Output};
use crate::conn::Conn;
use crate::protocol::{self, Frame, RoomName};

/// Lifecycle hooks a script may register, as bits so the session can skip plugins that
/// registered none.
#[derive(Clone, Copy, Default, Debug, PartialEq, Eq)]
pub struct HookMask(pub u8);

impl HookMask {
    pub const CONNECT: u8 = 1;
    pub const DISCONNECT: u8 = 2;
    pub const JOIN: u8 = 4;
    pub const LEAVE: u8 = 8;

    pub fn has(self, bit: u8) -> bool {
        self.0 & bit != 0
    }
}

impl std::fmt::Display for HookMask {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names = [
            (Self::CONNECT, "connect"),
            (Self::DISCONNECT, "disconnect"),
            (Self::JOIN, "join"),
            (Self::LEAVE, "leave"),
        ];
        let set: Vec<&str> = names.iter().filter(|(bit, _)| self.has(*bit)).map(|(_, name)| *name).collect();
        write!(f, "[{}]", set.join(", "))
    }
}

/// State shared between the worker and the functions it installed into its VM.
#[derive(Default)]
pub struct VmShared {
    pub handlers: Mutex<HashMap<String, Function>>,
    pub hooks: Mutex<[Option<Function>; 4]>,
    pub export_state: Mutex<Option<Function>>,
    pub import_state: Mutex<Option<Function>>,
    /// Registration is only allowed while the script's top level runs.
    pub loading: AtomicBool,
    pub timers: Mutex<Timers>,
}

#[derive(Default)]
pub struct Timers {
    next_id: u64,
    pub due: BinaryHeap<std::cmp::Reverse<(Instant, u64)>>,
    pub callbacks: HashMap<u64, Function>,
}

impl Timers {
    /// How many timers were ever armed (a change across a call means it armed one).
    pub fn armed(&self) -> u64 {
        self.next_id
    }

    /// The earliest deadline of a timer that is still armed.
    pub fn next_deadline(&mut self) -> Option<Instant> {
        while let Some(std::cmp::Reverse((at, id))) = self.due.peek().copied() {
            if self.callbacks.contains_key(&id) {
                return Some(at);
            }
            self.due.pop();
        }
        None
    }

    /// Removes and returns the callback of one timer that is due at `now`, if any.
    pub fn pop_due(&mut self, now: Instant) -> Option<Function> {
        while let Some(std::cmp::Reverse((at, id))) = self.due.peek().copied() {
            if at > now {
                return None;
            }
            self.due.pop();
            if let Some(f) = self.callbacks.remove(&id) {
                return Some(f);
            }
        }
        None
    }
}

/// Most timers a script may have armed at once; `rtgate.after` errors past it.
const MAX_TIMERS: usize = 100_000;

/// Creates a VM with only the safe standard libraries and the `rtgate` table installed,
/// then seals it (`sandbox`) so the script cannot alter built-ins.
pub fn new_vm(outlet: &Arc<Outlet>, plugin: &Arc<str>, shared: &Arc<VmShared>) -> mlua::Result<Lua> {
    let libs = StdLib::COROUTINE
        | StdLib::TABLE
        | StdLib::STRING
        | StdLib::UTF8
        | StdLib::BIT
        | StdLib::MATH
        | StdLib::BUFFER
        | StdLib::OS;
    let lua = Lua::new_with(libs, mlua::LuaOptions::default())?;
    let globals = lua.globals();
    // mlua gives Luau a filesystem `require` and a source `loadstring`; a plugin gets
    // neither. `getfenv`/`setfenv` would let a script reach outside its environment.
    for name in ["require", "loadstring", "load", "dofile", "loadfile", "getfenv", "setfenv", "newproxy", "gcinfo"] {
        globals.raw_set(name, Value::Nil)?;
    }
    // Luau's `os` has only clock/date/difftime/time, all harmless; keep it as it is.
    let log_name = plugin.clone();
    globals.raw_set(
        "print",
        lua.create_function(move |_, args: mlua::Variadic<Value>| {
            let line: Vec<String> = args.iter().map(|v| v.to_string().unwrap_or_default()).collect();
            tracing::info!(plugin = %log_name, "{}", line.join("\t"));
            Ok(())
        })?,
    )?;
    globals.raw_set("rtgate", api_table(&lua, outlet, plugin, shared)?)?;
    lua.sandbox(true)?;
    Ok(lua)
}

/// Compiles and runs the script's top level, which registers its handlers.
pub fn load_script(lua: &Lua, shared: &VmShared, file_name: &str, source: &str) -> mlua::Result<()> {
    shared.loading.store(true, Ordering::Relaxed);
    let result = lua.load(source).set_name(format!("={file_name}")).set_mode(ChunkMode::Text).exec();
    shared.loading.store(false, Ordering::Relaxed);
    result
}

fn api_table(lua: &Lua, outlet: &Arc<Outlet>, plugin: &Arc<str>, shared: &Arc<VmShared>) -> mlua::Result<Table> {
    let host = &outlet.host;
    let rt = lua.create_table()?;
    rt.raw_set("null", lua.null())?;
    rt.raw_set("plugin", &**plugin)?;
    rt.raw_set("allow_global_chat", host.allow_global_chat)?;

    let s = shared.clone();
    rt.raw_set(
        "on",
        lua.create_function(move |_, (kind, f): (String, Function)| {
            if !s.loading.load(Ordering::Relaxed) {
                return Err(mlua::Error::runtime("rtgate.on may only be called while the script loads"));
            }
            if kind.is_empty() || kind.len() > 64 || matches!(kind.as_str(), "join_room" | "leave_room") {
                return Err(mlua::Error::runtime(format!("cannot register a handler for \"{kind}\"")));
            }
            s.handlers.lock().insert(kind, f);
            Ok(())
        })?,
    )?;
    for (name, slot) in [("on_connect", 0usize), ("on_disconnect", 1), ("on_join", 2), ("on_leave", 3)] {
        let s = shared.clone();
        rt.raw_set(
            name,
            lua.create_function(move |_, f: Function| {
                if !s.loading.load(Ordering::Relaxed) {
                    return Err(mlua::Error::runtime("hooks may only be registered while the script loads"));
                }
                s.hooks.lock()[slot] = Some(f);
                Ok(())
            })?,
        )?;
    }
    let s = shared.clone();
    rt.raw_set(
        "on_state",
        lua.create_function(move |_, (export, import): (Function, Function)| {
            if !s.loading.load(Ordering::Relaxed) {
                return Err(mlua::Error::runtime("rtgate.on_state may only be called while the script loads"));
            }
            *s.export_state.lock() = Some(export);
            *s.import_state.lock() = Some(import);
            Ok(())
        })?,
    )?;

    let o = outlet.clone();
    rt.raw_set(
        "send",
        lua.create_function(move |_, (id, msg): (String, Value)| {
            let frame = Frame::text(encode(&o.host, &msg)?);
            let present = o.host.hub.conn(&id).is_some();
            if present {
                o.emit(Output::ToId(id, frame));
            }
            Ok(present)
        })?,
    )?;

    let o = outlet.clone();
    rt.raw_set(
        "publish",
        lua.create_function(move |lua, (room, msg, opts): (String, Value, Option<Table>)| {
            // A bad room name is the client's mistake, not the script's: return it as
            // `nil, code, message` for the handler to pass on, instead of raising.
            let room = match RoomName::parse(&room) {
                Ok(room) => room,
                Err(e) => {
                    let code = Value::String(lua.create_string(e.code())?);
                    return Ok((Value::Nil, code, Value::String(lua.create_string(e.to_string())?)));
                }
            };
            let (exclude, persist): (Option<String>, bool) = match &opts {
                Some(o) => (o.raw_get("exclude")?, o.raw_get::<Option<bool>>("persist")?.unwrap_or(false)),
                None => (None, false),
            };
            if persist
                && let Value::Table(t) = &msg
                && !t.raw_get::<Value>("seq")?.is_nil()
            {
                return Err(mlua::Error::runtime("a persisted message's \"seq\" is assigned by the gateway"));
            }
            let body = encode(&o.host, &msg)?;
            o.emit(Output::Publish { room, body, exclude, persist });
            Ok((Value::Boolean(true), Value::Nil, Value::Nil))
        })?,
    )?;

    let o = outlet.clone();
    rt.raw_set(
        "broadcast",
        lua.create_function(move |_, (msg, opts): (Value, Option<Table>)| {
            let exclude: Option<String> = match &opts {
                Some(o) => o.raw_get("exclude")?,
                None => None,
            };
            let frame = Frame::text(encode(&o.host, &msg)?);
            o.emit(Output::Broadcast { frame, exclude });
            Ok(true)
        })?,
    )?;

    let o = outlet.clone();
    rt.raw_set(
        "error",
        lua.create_function(move |_, (id, code, message): (String, String, String)| {
            let present = o.host.hub.conn(&id).is_some();
            if present {
                o.emit(Output::ToId(id, protocol::error_frame(&code, &message)));
            }
            Ok(present)
        })?,
    )?;

    let h = host.clone();
    rt.raw_set(
        "members",
        lua.create_function(move |lua, room: String| {
            let room = RoomName::parse(&room).map_err(|e| mlua::Error::runtime(e.to_string()))?;
            let ids = h.hub.members(&room);
            let t = lua.create_table_with_capacity(ids.len(), 0)?;
            for id in ids {
                t.raw_push(&*id)?;
            }
            t.set_metatable(Some(lua.array_metatable()))?;
            Ok(t)
        })?,
    )?;

    let h = host.clone();
    rt.raw_set(
        "in_room",
        lua.create_function(move |_, (id, room): (String, String)| {
            let Ok(room) = RoomName::parse(&room) else { return Ok(false) };
            Ok(h.hub.conn(&id).is_some_and(|c| c.in_room(&room)))
        })?,
    )?;

    let h = host.clone();
    rt.raw_set(
        "check_member",
        lua.create_function(move |_, (id, room): (String, Value)| {
            // Returns nothing when `id` may act in `room`, else the error to return.
            let Value::String(room) = room else {
                return Ok((Some("invalid_room".to_string()), Some("\"room\" must be a room name".to_string())));
            };
            let room = room.to_string_lossy();
            match RoomName::parse(&room) {
                Ok(name) if h.hub.conn(&id).is_some_and(|c| c.in_room(&name)) => Ok((None, None)),
                Ok(_) => Ok((Some("not_in_room".to_string()), Some(format!("You are not in room \"{room}\"")))),
                Err(e) => Ok((Some(e.code().to_string()), Some(e.to_string()))),
            }
        })?,
    )?;

    let h = host.clone();
    rt.raw_set(
        "client",
        lua.create_function(move |lua, id: String| match h.hub.conn(&id) {
            Some(conn) => Ok(Value::Table(client_table(lua, &conn)?)),
            None => Ok(Value::Nil),
        })?,
    )?;

    rt.raw_set("now_ms", lua.create_function(|_, ()| Ok(crate::clock::now_ms()))?)?;
    rt.raw_set("now_iso", lua.create_function(|_, ()| Ok(crate::clock::now_iso()))?)?;
    rt.raw_set(
        "random_id",
        lua.create_function(|_, prefix: Option<String>| {
            let id = crate::conn::new_client_id();
            Ok(format!("{}{}", prefix.unwrap_or_default(), &id["client_".len()..]))
        })?,
    )?;
    rt.raw_set(
        "array",
        lua.create_function(|lua, t: Option<Table>| {
            let t = match t {
                Some(t) => t,
                None => lua.create_table()?,
            };
            t.set_metatable(Some(lua.array_metatable()))?;
            Ok(t)
        })?,
    )?;

    let s = shared.clone();
    rt.raw_set(
        "after",
        lua.create_function(move |_, (ms, f): (f64, Function)| {
            if !(0.0..=86_400_000.0).contains(&ms) {
                return Err(mlua::Error::runtime("rtgate.after: delay must be 0 to 86400000 ms"));
            }
            let mut timers = s.timers.lock();
            if timers.callbacks.len() >= MAX_TIMERS {
                return Err(mlua::Error::runtime("rtgate.after: too many timers"));
            }
            timers.next_id += 1;
            let id = timers.next_id;
            let at = Instant::now() + Duration::from_micros((ms * 1000.0) as u64);
            timers.due.push(std::cmp::Reverse((at, id)));
            timers.callbacks.insert(id, f);
            Ok(id)
        })?,
    )?;
    let s = shared.clone();
    rt.raw_set(
        "cancel",
        lua.create_function(move |_, id: Option<u64>| {
            Ok(id.is_some_and(|id| s.timers.lock().callbacks.remove(&id).is_some()))
        })?,
    )?;

    let settings = lua.to_value(&host.plugin_settings(plugin))?;
    rt.raw_set("config", settings)?;
    Ok(rt)
}

/// The `client` argument handlers receive.
pub fn client_table(lua: &Lua, conn: &Conn) -> mlua::Result<Table> {
    let t = lua.create_table_with_capacity(0, 4)?;
    t.raw_set("id", &*conn.id)?;
    t.raw_set("userId", &*conn.identity.user_id)?;
    let profile = conn.identity.profile();
    t.raw_set("username", &*profile.username)?;
    t.raw_set("admin", profile.admin)?;
    Ok(t)
}

/// Serializes a message table once, into the text every recipient will share, with any
/// markup the script put in cleaned.
fn encode(host: &Host, msg: &Value) -> mlua::Result<String> {
    let Value::Table(t) = msg else {
        return Err(mlua::Error::runtime("a message must be a table"));
    };
    if !matches!(t.raw_get::<Value>("type")?, Value::String(_)) {
        return Err(mlua::Error::runtime("a message needs a string field \"type\""));
    }
    let text = serde_json::to_string(msg).map_err(|e| mlua::Error::runtime(format!("cannot encode message: {e}")))?;
    Ok(host.sanitizer.clean_output(text))
}
