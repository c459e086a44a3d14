//! One plugin's VM ([`Core`]) and its thread ([`Worker`]).
//!
//! Each plugin has a Luau VM of its own behind a lock, and a thread of its own that runs
//! what is queued for it (events, lifecycle hooks, timers) one at a time, in order. The
//! thread is what makes the sandbox's promises real: a script stuck until its time budget
//! runs out occupies its own thread, so every other connection and plugin carries on. A
//! session may also run an event on its own runtime worker when the plugin is idle
//! (nothing queued, none of its output waiting) and has been quick: that saves two thread
//! hand-offs per event, and a call that turns out slow sends the plugin back to its thread
//! for a while (see `Plugin::try_inline`). Either way calls are serialized by the lock, and
//! the memory limit is the VM's own.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use mlua::{Function, IntoLuaMulti, Lua, LuaSerdeExt, Value};
use parking_lot::Mutex;
use serde_json::Map;
use tokio::sync::oneshot;

use super::api::{self, HookMask, VmShared};
use super::{Outlet, Output, Successor};
use crate::conn::Conn;
use crate::error::ClientError;
use crate::protocol::RoomName;

pub(crate) enum Job {
    Event {
        conn: Arc<Conn>,
        kind: Arc<str>,
        body: Map<String, serde_json::Value>,
    },
    Hook {
        hook: u8,
        conn: Arc<Conn>,
        room: Option<RoomName>,
    },
    /// Finish what is queued, hand the script's exported state to `reply`, and stop.
    Retire {
        reply: oneshot::Sender<Option<serde_json::Value>>,
    },
    /// An event run on a runtime worker armed a timer: look at the timers again.
    Wake,
}

/// What a script registered while it loaded.
#[derive(Debug, Clone)]
pub struct Registered {
    pub events: Vec<String>,
    pub hooks: HookMask,
}

/// Why a handler call did not complete.
enum Failure {
    Timeout,
    Memory,
    Lua(mlua::Error),
}

pub(crate) struct Vm {
    lua: Lua,
    shared: Arc<VmShared>,
    /// When the running call must stop, in nanoseconds since `epoch`; 0: no call running.
    deadline: Arc<AtomicU64>,
    epoch: Instant,
    timed_out: Arc<AtomicBool>,
}

/// Builds the VM and runs the script's top level; the result says what it registered, or
/// why it failed (with the file name and line, as Lua reports them).
pub(crate) fn load(outlet: &Arc<Outlet>, name: &Arc<str>, file_name: &str, source: &str) -> Result<Vm, String> {
    let host = &outlet.host;
    let shared = Arc::new(VmShared::default());
    let lua = api::new_vm(outlet, name, &shared).map_err(|e| e.to_string())?;
    lua.set_memory_limit(host.settings.memory_limit_mb << 20).map_err(|e| e.to_string())?;
    let deadline = Arc::new(AtomicU64::new(0));
    let timed_out = Arc::new(AtomicBool::new(false));
    let epoch = Instant::now();
    let (d, t) = (deadline.clone(), timed_out.clone());
    // Luau calls this at every function call and loop back-edge, in coroutines and under
    // pcall too; once the deadline has passed it keeps failing, so a script that catches
    // the error still cannot continue.
    lua.set_interrupt(move |_| {
        let at = d.load(Ordering::Relaxed);
        if at != 0 && epoch.elapsed().as_nanos() as u64 >= at {
            t.store(true, Ordering::Relaxed);
            return Err(mlua::Error::runtime("plugin exceeded its time budget"));
        }
        Ok(mlua::VmState::Continue)
    });
    let vm = Vm { lua, shared, deadline, epoch, timed_out };
    // The top level runs under the same budget as a handler.
    let budget = host.settings.time_budget;
    match vm.guarded(budget, |lua| api::load_script(lua, &vm.shared, file_name, source)) {
        Ok(()) => Ok(vm),
        Err(Failure::Timeout) => Err(format!("{file_name}: loading exceeded the time budget")),
        Err(Failure::Memory) => Err(format!("{file_name}: loading exceeded the memory limit")),
        Err(Failure::Lua(e)) => Err(first_line(&e)),
    }
}

impl Vm {
    pub(crate) fn registered(&self) -> Registered {
        let mut events: Vec<String> = self.shared.handlers.lock().keys().cloned().collect();
        events.sort();
        let hooks = self.shared.hooks.lock();
        let mut mask = 0;
        for (i, bit) in [HookMask::CONNECT, HookMask::DISCONNECT, HookMask::JOIN, HookMask::LEAVE].iter().enumerate() {
            if hooks[i].is_some() {
                mask |= bit;
            }
        }
        Registered { events, hooks: HookMask(mask) }
    }

    /// Runs `f` under the time budget, and classifies a failure.
    fn guarded<R>(&self, budget: Duration, f: impl FnOnce(&Lua) -> mlua::Result<R>) -> Result<R, Failure> {
        self.timed_out.store(false, Ordering::Relaxed);
        let at = (self.epoch.elapsed() + budget).as_nanos() as u64;
        self.deadline.store(at.max(1), Ordering::Relaxed);
        let result = f(&self.lua);
        self.deadline.store(0, Ordering::Relaxed);
        if self.timed_out.load(Ordering::Relaxed) {
            return Err(Failure::Timeout);
        }
        result.map_err(|e| if is_memory_error(&e) { Failure::Memory } else { Failure::Lua(e) })
    }
}

fn is_memory_error(e: &mlua::Error) -> bool {
    match e {
        mlua::Error::MemoryError(_) => true,
        mlua::Error::CallbackError { cause, .. } => is_memory_error(cause),
        mlua::Error::WithContext { cause, .. } => is_memory_error(cause),
        _ => false,
    }
}

/// Lua errors carry a traceback; the first line says what and where.
fn first_line(e: &mlua::Error) -> String {
    let text = match e {
        mlua::Error::SyntaxError { message, .. } => message.clone(),
        mlua::Error::RuntimeError(m) => m.clone(),
        mlua::Error::CallbackError { cause, .. } => return first_line(cause),
        other => other.to_string(),
    };
    text.lines().next().unwrap_or_default().to_string()
}

/// A plugin's VM and what it takes to run it.
pub(crate) struct Core {
    /// The way out for what the script sends, and (`outlet.host`) the gateway it runs in.
    outlet: Arc<Outlet>,
    name: Arc<str>,
    /// (file name, source): to start the script afresh if its VM is wedged at its memory
    /// limit.
    script: (String, String),
    vm: Vm,
    budget: Duration,
    /// Throttle for error logs: a client can provoke errors at will, the log must not grow
    /// with it.
    last_log: Option<Instant>,
    suppressed: u64,
    /// Until when client events go to the thread only, after a call that failed or ran
    /// long: a script that can run long must not hold up a runtime worker more than once
    /// in a while.
    thread_only_until: Option<Instant>,
}

/// A call using more CPU than this (or failing) keeps the plugin's events on its thread
/// for [`SLOW_PENALTY`].
const INLINE_LIMIT: Duration = Duration::from_millis(2);
const SLOW_PENALTY: Duration = Duration::from_secs(60);

/// CPU time this thread has used. Slowness is judged on it rather than on the wall
/// clock, which on a loaded machine also counts the time the thread was preempted.
fn thread_cpu() -> Duration {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid, writable timespec; the clock id is a constant Linux supports.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

impl Core {
    pub(crate) fn new(outlet: Arc<Outlet>, name: Arc<str>, script: (String, String), vm: Vm) -> Core {
        let budget = outlet.host.settings.time_budget;
        Core { outlet, name, script, vm, budget, last_log: None, suppressed: 0, thread_only_until: None }
    }

    /// Timers armed so far, counted; a change across a call means it armed one.
    pub(crate) fn timers_armed(&self) -> u64 {
        self.vm.shared.timers.lock().armed()
    }

    /// Whether a client event may run on the runtime worker that received it.
    pub(crate) fn may_run_inline(&self) -> bool {
        self.thread_only_until.is_none_or(|until| Instant::now() >= until)
    }

    /// Runs the handler of `kind`.
    pub(crate) fn event(&mut self, conn: &Arc<Conn>, kind: &str, body: Map<String, serde_json::Value>) {
        let cpu = thread_cpu();
        if !self.handle(conn, kind, body) || thread_cpu().saturating_sub(cpu) > INLINE_LIMIT {
            self.thread_only_until = Some(Instant::now() + SLOW_PENALTY);
        }
    }

    /// False if the handler failed (an error, its time or its memory).
    fn handle(&mut self, conn: &Arc<Conn>, kind: &str, body: Map<String, serde_json::Value>) -> bool {
        self.outlet.host.metrics.plugin_calls.fetch_add(1, Ordering::Relaxed);
        let handler = self.vm.shared.handlers.lock().get(kind).cloned();
        let Some(handler) = handler else {
            // The script was replaced by one without this handler while the event queued.
            self.outlet.emit(Output::To(conn.clone(), ClientError::unknown_type(kind).to_frame()));
            return true;
        };
        let started = Instant::now();
        let result = self.vm.guarded(self.budget, |lua| {
            let client = api::client_table(lua, conn)?;
            let event = lua.to_value(&body)?;
            handler.call::<mlua::MultiValue>((client, event))
        });
        self.outlet.host.metrics.plugin_call_us.record_duration(started.elapsed());
        match result {
            Ok(ret) => {
                // `return "code", "message"` refuses the event with that error.
                let mut ret = ret.into_iter();
                if let Some(Value::String(code)) = ret.next() {
                    let code = code.to_string_lossy();
                    let message = match ret.next() {
                        Some(Value::String(m)) => m.to_string_lossy(),
                        _ => code.clone(),
                    };
                    self.outlet.emit(Output::To(conn.clone(), ClientError::Rejected { code, message }.to_frame()));
                }
                true
            }
            Err(failure) => {
                self.report(kind, failure);
                self.outlet.emit(Output::To(conn.clone(), ClientError::PluginError(kind.to_string()).to_frame()));
                false
            }
        }
    }

    fn hook(&mut self, hook: u8, conn: &Arc<Conn>, room: Option<RoomName>) {
        let slot = hook.trailing_zeros() as usize;
        let Some(f) = self.vm.shared.hooks.lock()[slot].clone() else { return };
        let label = ["on_connect", "on_disconnect", "on_join", "on_leave"][slot];
        let result = self.vm.guarded(self.budget, |lua| {
            let client = api::client_table(lua, conn)?;
            match &room {
                Some(room) => f.call::<()>((client, room.as_str())),
                None => f.call::<()>(client),
            }
        });
        if let Err(failure) = result {
            self.report(label, failure);
        }
    }

    fn next_deadline(&self) -> Option<Instant> {
        self.vm.shared.timers.lock().next_deadline()
    }

    fn fire_timers(&mut self) {
        loop {
            let due = self.vm.shared.timers.lock().pop_due(Instant::now());
            let Some(f) = due else { return };
            if let Err(failure) = self.call(&f, ()) {
                self.report("timer", failure);
            }
        }
    }

    fn call(&self, f: &Function, args: impl IntoLuaMulti) -> Result<(), Failure> {
        self.vm.guarded(self.budget, |_| f.call::<()>(args))
    }

    fn export_state(&mut self) -> Option<serde_json::Value> {
        let f = self.vm.shared.export_state.lock().clone()?;
        let result = self.vm.guarded(self.budget, |lua| {
            let v: Value = f.call(())?;
            lua.from_value::<serde_json::Value>(v)
        });
        match result {
            Ok(v) => Some(v),
            Err(failure) => {
                self.report("on_state export", failure);
                None
            }
        }
    }

    fn import_state(&mut self, state: serde_json::Value) {
        let Some(f) = self.vm.shared.import_state.lock().clone() else { return };
        let result = self.vm.guarded(self.budget, |lua| f.call::<()>(lua.to_value(&state)?));
        if let Err(failure) = result {
            self.report("on_state import", failure);
        }
    }

    /// After a memory failure: collect what the failed call left unreferenced; if the VM
    /// still holds most of its limit (a script hoarding in globals), every later call would
    /// fail too, so the script is started afresh and its in-memory state is lost.
    fn recover_memory(&mut self) {
        let _ = self.vm.lua.gc_collect();
        let limit = self.outlet.host.settings.memory_limit_mb << 20;
        if self.vm.lua.used_memory() < limit / 4 * 3 {
            return;
        }
        let (file, source) = &self.script;
        match load(&self.outlet, &self.name, file, source) {
            Ok(vm) => {
                self.vm = vm;
                tracing::warn!(plugin = %self.name, "plugin restarted with fresh state: it held its whole memory limit");
            }
            Err(e) => tracing::error!(plugin = %self.name, "plugin could not be restarted: {e}"),
        }
    }

    fn report(&mut self, what: &str, failure: Failure) {
        let metrics = &self.outlet.host.metrics;
        match failure {
            Failure::Timeout => metrics.plugin_timeouts.fetch_add(1, Ordering::Relaxed),
            _ => metrics.plugin_errors.fetch_add(1, Ordering::Relaxed),
        };
        if let Failure::Memory = failure {
            self.recover_memory();
        }
        let now = Instant::now();
        if self.last_log.is_some_and(|t| now.duration_since(t) < Duration::from_secs(1)) {
            self.suppressed += 1;
            return;
        }
        self.last_log = Some(now);
        let suppressed = std::mem::take(&mut self.suppressed);
        let error = match failure {
            Failure::Timeout => format!("stopped after the time budget of {:?}", self.budget),
            Failure::Memory => {
                format!("stopped at the memory limit of {} MiB", self.outlet.host.settings.memory_limit_mb)
            }
            Failure::Lua(e) => first_line(&e),
        };
        tracing::warn!(plugin = %self.name, handler = what, suppressed, "plugin error: {error}");
    }
}

/// The plugin's thread.
pub(crate) struct Worker {
    pub core: Arc<Mutex<Core>>,
    /// Client events queued (the `plugins.queue` bound).
    pub pending: Arc<AtomicUsize>,
    /// Jobs of any kind queued.
    pub queued: Arc<AtomicUsize>,
    /// False until a reloaded version has imported its predecessor's state.
    pub ready: Arc<AtomicBool>,
}

impl Worker {
    /// The thread's body. `state`, when given, is the previous version's exported state
    /// (hot reload): it is imported before any job runs.
    pub(crate) fn run(
        self,
        jobs: Receiver<Job>,
        state: Option<oneshot::Receiver<Option<serde_json::Value>>>,
        successor: Arc<OnceLock<Successor>>,
    ) {
        if let Some(state) = state {
            match state.blocking_recv() {
                Ok(Some(value)) => self.core.lock().import_state(value),
                Ok(None) => {}
                // The reload was abandoned: nothing will ever be queued here.
                Err(_) => return,
            }
        }
        self.ready.store(true, Ordering::Release);
        loop {
            let next = self.core.lock().next_deadline();
            let job = match next {
                Some(at) => match jobs.recv_timeout(at.saturating_duration_since(Instant::now())) {
                    Ok(job) => Some(job),
                    Err(RecvTimeoutError::Timeout) => None,
                    Err(RecvTimeoutError::Disconnected) => return,
                },
                None => match jobs.recv() {
                    Ok(job) => Some(job),
                    Err(_) => return,
                },
            };
            let mut core = self.core.lock();
            let was_job = job.is_some();
            match job {
                Some(Job::Event { conn, kind, body }) => {
                    core.outlet.host.metrics.plugin_events_on_thread.fetch_add(1, Ordering::Relaxed);
                    core.event(&conn, &kind, body);
                    self.pending.fetch_sub(1, Ordering::Relaxed);
                }
                Some(Job::Hook { hook, conn, room }) => core.hook(hook, &conn, room),
                Some(Job::Retire { reply }) => {
                    let _ = reply.send(core.export_state());
                    drop(core);
                    self.hand_over(&jobs, successor.get());
                    return;
                }
                Some(Job::Wake) | None => {}
            }
            core.fire_timers();
            drop(core);
            if was_job {
                // After the work and under no lock: a session that sees zero may run the
                // next event itself, and it will find everything before it done.
                self.queued.fetch_sub(1, Ordering::Release);
            }
        }
    }

    /// After retiring: jobs sent by sessions that read the routing table just before the
    /// reload swapped it go to the new version, or, if the plugin was deleted, are refused.
    fn hand_over(&self, jobs: &Receiver<Job>, successor: Option<&Successor>) {
        while let Ok(job) = jobs.try_recv() {
            self.queued.fetch_sub(1, Ordering::Relaxed);
            if let Job::Event { .. } = job {
                self.pending.fetch_sub(1, Ordering::Relaxed);
            }
            match (successor, job) {
                (Some(next), job) => next.forward(job),
                (None, Job::Event { conn, kind, .. }) => {
                    conn.send(ClientError::unknown_type(&kind).to_frame());
                }
                (None, _) => {}
            }
        }
    }
}
