//! Plugins: the Lua scripts that handle every event type the core does not.
//!
//! The plugin host loads each `*.lua` in the plugin directory into a sandboxed VM on a
//! thread of its own ([`worker`]), records which event types each registered, and routes a
//! client's event to the one plugin that owns its type. The routing table is swapped
//! atomically, so sessions read it without a lock and a reload never blocks them.
//! Two scripts registering the same type is a start-up error naming both files; a script
//! that fails to load is reported and skipped, and the rest run.

mod api;
mod reload;
mod worker;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc as StdArc, OnceLock};

use arc_swap::ArcSwap;
use serde_json::{Map, Value};
use tokio::sync::oneshot;

pub use api::HookMask;
pub use reload::Watching;
use worker::{Core, Job, Registered, Worker};

use crate::config::PluginSettings;
use crate::conn::Conn;
use crate::error::ClientError;
use crate::hub::{Broker, Hub};
use crate::metrics::Metrics;
use crate::protocol::Frame;
use crate::protocol::RoomName;

/// What scripts can reach: the hub to read membership, the broker to fan out, and the
/// output queue.
pub struct Host {
    pub hub: Arc<Hub>,
    pub broker: Arc<dyn Broker>,
    /// Output of calls run on plugin threads, in order, to [`deliver_output`].
    pub output: tokio::sync::mpsc::Sender<Queued>,
    pub metrics: Arc<Metrics>,
    /// Cleans markup a script put into its output.
    pub sanitizer: Arc<crate::sanitize::Sanitizer>,
    pub settings: PluginSettings,
    /// `limits.allow_global_chat` as it applies in this auth mode: `rtgate.allow_global_chat`.
    pub allow_global_chat: bool,
}

impl Host {
    /// `[plugins.settings.<name>]` from the configuration, as `rtgate.config`.
    fn plugin_settings(&self, plugin: &str) -> Value {
        self.settings.settings.get(plugin).cloned().unwrap_or_else(|| Value::Object(Map::new()))
    }
}

/// One thing a plugin sends.
pub enum Output {
    To(Arc<Conn>, Frame),
    ToId(String, Frame),
    Publish { room: RoomName, body: String, exclude: Option<String>, persist: bool },
    Broadcast { frame: Frame, exclude: Option<String> },
}

/// Output on its way from a plugin thread, with its plugin's count of output not yet
/// delivered.
pub struct Queued {
    unsent: Arc<AtomicUsize>,
    out: Output,
}

/// One plugin's way out. A call running on a runtime worker delivers at once: fan-out
/// inside the runtime makes waking each recipient cheap local scheduling, and the call
/// only runs there when none of the plugin's earlier output is still queued, so order
/// holds. A call on the plugin's own thread queues its output to [`deliver_output`]
/// instead: fanning out from a thread outside the runtime would wake every recipient's
/// task across threads (a system call each, at worst).
pub struct Outlet {
    pub host: Arc<Host>,
    unsent: Arc<AtomicUsize>,
}

impl Outlet {
    pub fn emit(&self, out: Output) {
        if tokio::runtime::Handle::try_current().is_ok() {
            deliver(&self.host.hub, &*self.host.broker, out);
            return;
        }
        self.unsent.fetch_add(1, Ordering::AcqRel);
        // Blocks the plugin thread when the queue is full: the script waits for the fan-out
        // to catch up. Closed only at shutdown, when there is nobody left to deliver to.
        if self.host.output.blocking_send(Queued { unsent: self.unsent.clone(), out }).is_err() {
            self.unsent.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

fn deliver(hub: &Hub, broker: &dyn Broker, out: Output) {
    match out {
        Output::To(conn, frame) => {
            conn.send(frame);
        }
        Output::ToId(id, frame) => {
            hub.send_to(&id, frame);
        }
        Output::Publish { room, body, exclude, persist } => {
            broker.publish(&room, body, exclude.as_deref(), persist);
        }
        Output::Broadcast { frame, exclude } => {
            broker.broadcast(&frame, exclude.as_deref());
        }
    }
}

/// Most plugin outputs waiting for delivery; a plugin thread that gets this far ahead
/// waits (its own queue, and so its clients, absorb the back-pressure).
pub const OUTPUT_QUEUE: usize = 65_536;

/// The task that delivers plugin threads' output, on the runtime, until every plugin is
/// gone.
pub async fn deliver_output(mut rx: tokio::sync::mpsc::Receiver<Queued>, hub: Arc<Hub>, broker: Arc<dyn Broker>) {
    while let Some(Queued { unsent, out }) = rx.recv().await {
        deliver(&hub, &*broker, out);
        unsent.fetch_sub(1, Ordering::AcqRel);
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    #[error("cannot read plugin directory {dir}: {source}")]
    Dir { dir: PathBuf, source: std::io::Error },
    #[error("event type \"{kind}\" is registered by both {first} and {second}")]
    Duplicate { kind: String, first: String, second: String },
}

/// A loaded plugin, as the routing table holds it.
pub struct Plugin {
    pub name: Arc<str>,
    pub file: PathBuf,
    pub registered: Registered,
    /// The script as loaded, to tell whether a file on disk changed.
    source: String,
    core: Arc<parking_lot::Mutex<Core>>,
    jobs: Sender<Job>,
    /// Client events queued for the thread (bounded by `queue`).
    pending: Arc<AtomicUsize>,
    /// Jobs of any kind queued for the thread.
    queued: Arc<AtomicUsize>,
    /// Output of the thread's calls not yet delivered.
    unsent: Arc<AtomicUsize>,
    /// False until a reloaded version has imported its predecessor's state.
    ready: Arc<AtomicBool>,
    /// Set when the plugin is being stopped or replaced.
    retired: AtomicBool,
    queue: usize,
    /// Events received per registered type, for /metrics.
    counts: HashMap<Arc<str>, std::sync::atomic::AtomicU64>,
    /// Set when a reload replaces this plugin: jobs that reach the old worker after its
    /// state was handed over are passed on to the new one instead of being lost.
    successor: StdArc<OnceLock<Successor>>,
}

enum SendFailure {
    /// `plugins.queue` events are already waiting.
    Full,
    /// The worker has stopped (a reload replaced it); the event is handed back.
    Stopped(Map<String, Value>),
}

/// Where a retired worker forwards stragglers.
#[derive(Clone)]
pub(crate) struct Successor {
    jobs: Sender<Job>,
    pending: Arc<AtomicUsize>,
    queued: Arc<AtomicUsize>,
}

impl Successor {
    pub(crate) fn forward(&self, job: Job) {
        if let Job::Event { .. } = job {
            self.pending.fetch_add(1, Ordering::Relaxed);
        }
        self.queued.fetch_add(1, Ordering::AcqRel);
        let _ = self.jobs.send(job);
    }
}

impl Plugin {
    /// Lets the worker finish its queue, stops it, and returns the script's exported state.
    async fn retire(&self) -> Option<Value> {
        self.retired.store(true, Ordering::Release);
        let (reply, done) = oneshot::channel();
        self.jobs.send(Job::Retire { reply }).ok()?;
        done.await.ok().flatten()
    }

    /// Queues a job for the plugin's thread.
    fn send_job(&self, job: Job) -> Result<(), Job> {
        self.queued.fetch_add(1, Ordering::AcqRel);
        self.jobs.send(job).map_err(|mpsc::SendError(job)| {
            self.queued.fetch_sub(1, Ordering::AcqRel);
            job
        })
    }

    fn send_event(&self, conn: &Arc<Conn>, kind: Arc<str>, body: Map<String, Value>) -> Result<(), SendFailure> {
        // The bound covers client events only; lifecycle hooks are bounded by the number
        // of connections and must not be dropped (a plugin relies on seeing a disconnect).
        if self.pending.fetch_add(1, Ordering::Relaxed) >= self.queue {
            self.pending.fetch_sub(1, Ordering::Relaxed);
            return Err(SendFailure::Full);
        }
        match self.send_job(Job::Event { conn: conn.clone(), kind, body }) {
            Ok(()) => Ok(()),
            Err(Job::Event { body, .. }) => {
                self.pending.fetch_sub(1, Ordering::Relaxed);
                Err(SendFailure::Stopped(body))
            }
            Err(_) => Err(SendFailure::Full),
        }
    }

    /// Runs the event here, on the calling runtime worker, if the plugin is idle and has
    /// been quick (`Core::may_run_inline`); otherwise hands the event back to be queued.
    /// Idle means nothing is queued for its thread and none of its output is waiting, so
    /// running now cannot overtake anything that came before.
    fn try_inline(&self, conn: &Arc<Conn>, kind: &str, body: Map<String, Value>) -> Result<(), Map<String, Value>> {
        let idle = || {
            self.ready.load(Ordering::Acquire)
                && !self.retired.load(Ordering::Acquire)
                && self.queued.load(Ordering::Acquire) == 0
                && self.unsent.load(Ordering::Acquire) == 0
        };
        if !idle() {
            return Err(body);
        }
        let Some(mut core) = self.core.try_lock() else { return Err(body) };
        // Again under the lock: the thread may have taken a job meanwhile and finished it.
        if !idle() || !core.may_run_inline() {
            return Err(body);
        }
        let armed = core.timers_armed();
        core.event(conn, kind, body);
        let armed_now = core.timers_armed() != armed;
        drop(core);
        if armed_now {
            // The thread may be asleep until a later deadline, or with none at all.
            let _ = self.send_job(Job::Wake);
        }
        Ok(())
    }

    fn successor(&self) -> Successor {
        Successor { jobs: self.jobs.clone(), pending: self.pending.clone(), queued: self.queued.clone() }
    }
}

#[derive(Default)]
struct Registry {
    by_event: HashMap<Arc<str>, Arc<Plugin>>,
    plugins: Vec<Arc<Plugin>>,
}

/// An event handler written in Rust, run on the session's worker in place of a script:
/// for programs that embed rtgate as a library, and for the Lua-hop benchmark, whose
/// "plugin call skipped" half is the chat plugin's work done here.
pub type NativeHandler = Box<dyn Fn(&Host, &Arc<Conn>, Map<String, Value>) -> Result<(), ClientError> + Send + Sync>;

pub struct PluginHost {
    host: Arc<Host>,
    registry: ArcSwap<Registry>,
    /// Event type → Rust handler; set at most once (see [`PluginHost::set_native`]).
    native: OnceLock<HashMap<String, NativeHandler>>,
    /// Bumped after every reload attempt, applied or refused (tests await it).
    reloads: tokio::sync::watch::Sender<u64>,
}

/// A plugin script read from disk (or the built-in copy).
struct Script {
    name: Arc<str>,
    file: PathBuf,
    source: String,
}

/// The bundled plugins, compiled in so that the binary runs anywhere: used when the
/// configured directory does not exist.
const BUILT_IN: &[(&str, &str)] = &[
    ("broadcast.lua", include_str!("../../plugins/broadcast.lua")),
    ("chat.lua", include_str!("../../plugins/chat.lua")),
    ("chat_message.lua", include_str!("../../plugins/chat_message.lua")),
    ("file_share.lua", include_str!("../../plugins/file_share.lua")),
    ("tictactoe.lua", include_str!("../../plugins/tictactoe.lua")),
    ("typing.lua", include_str!("../../plugins/typing.lua")),
];

impl PluginHost {
    /// Loads every script of the plugin directory. Only an unreadable directory or a
    /// duplicate registration is fatal; a broken script is logged and left out.
    pub async fn start(host: Arc<Host>) -> Result<PluginHost, PluginError> {
        let scripts = read_scripts(&host.settings.dir)?;
        let mut plugins = Vec::new();
        for script in scripts {
            match spawn(&host, &script, None).await {
                Ok(plugin) => plugins.push(plugin),
                Err(error) => tracing::error!(file = %script.file.display(), "plugin not loaded: {error}"),
            }
        }
        let registry = build_registry(plugins)?;
        for plugin in &registry.plugins {
            tracing::info!(
                plugin = %plugin.name,
                events = ?plugin.registered.events,
                hooks = %plugin.registered.hooks,
                "plugin loaded"
            );
        }
        let (reloads, _) = tokio::sync::watch::channel(0);
        Ok(PluginHost { host, registry: ArcSwap::from_pointee(registry), native: OnceLock::new(), reloads })
    }

    /// Installs Rust handlers, which take precedence over scripts registering the same
    /// event types. Once only, so that routing stays a lock-free read; a second call hands
    /// its handlers back.
    pub fn set_native(&self, handlers: HashMap<String, NativeHandler>) -> Result<(), HashMap<String, NativeHandler>> {
        self.native.set(handlers)
    }

    /// Routes a client event to the handler registered for its type.
    pub fn dispatch(&self, conn: &Arc<Conn>, kind: &str, mut body: Map<String, Value>) -> Result<(), ClientError> {
        if let Some(handler) = self.native.get().and_then(|n| n.get(kind)) {
            return handler(&self.host, conn, body);
        }
        // Twice at most: a worker found stopped was just replaced by a reload, and the
        // fresh routing table names its successor.
        for _ in 0..2 {
            let registry = self.registry.load();
            let Some((kind, plugin)) = registry.by_event.get_key_value(kind) else {
                self.host.metrics.core_event("invalid");
                return Err(ClientError::unknown_type(kind));
            };
            if let Some(count) = plugin.counts.get(kind) {
                count.fetch_add(1, Ordering::Relaxed);
            }
            body = match plugin.try_inline(conn, kind, body) {
                Ok(()) => return Ok(()),
                Err(body) => body,
            };
            match plugin.send_event(conn, kind.clone(), body) {
                Ok(()) => return Ok(()),
                Err(SendFailure::Full) => break,
                Err(SendFailure::Stopped(returned)) => body = returned,
            }
        }
        self.host.metrics.plugin_busy.fetch_add(1, Ordering::Relaxed);
        Err(ClientError::Busy)
    }

    /// Tells every plugin that registered `hook` (a [`HookMask`] bit) about a lifecycle
    /// event.
    pub fn hook(&self, hook: u8, conn: &Arc<Conn>, room: Option<&RoomName>) {
        for plugin in &self.registry.load().plugins {
            if plugin.registered.hooks.has(hook) {
                let job = Job::Hook { hook, conn: conn.clone(), room: room.cloned() };
                if let Err(job) = plugin.send_job(job) {
                    // The worker stopped between our reading the table and sending: a reload
                    // just replaced it. Hooks must not be lost (a game must hear of a
                    // disconnect), so hand it to whoever now has this plugin's name.
                    self.resend_hook(&plugin.name, job);
                }
            }
        }
    }

    fn resend_hook(&self, name: &str, job: Job) {
        if let Some(current) = self.registry.load().plugins.iter().find(|p| &*p.name == name) {
            let _ = current.send_job(job);
        }
    }

    /// `(event type, events received)` for every registered type, for /metrics.
    pub fn event_counts(&self) -> Vec<(String, u64)> {
        let registry = self.registry.load();
        let mut counts: Vec<(String, u64)> = registry
            .plugins
            .iter()
            .flat_map(|p| p.counts.iter().map(|(k, c)| (k.to_string(), c.load(Ordering::Relaxed))))
            .collect();
        counts.sort();
        counts
    }

    /// A receiver that changes after every reload attempt.
    pub fn reloads(&self) -> tokio::sync::watch::Receiver<u64> {
        self.reloads.subscribe()
    }

    /// `(plugin name, event types)` for every loaded plugin, for logs and `/healthz`.
    pub fn summary(&self) -> Vec<(Arc<str>, Vec<String>)> {
        self.registry.load().plugins.iter().map(|p| (p.name.clone(), p.registered.events.clone())).collect()
    }

    /// Lets every worker finish its queue, then stops it.
    pub async fn shutdown(&self) {
        let registry = self.registry.swap(Arc::new(Registry::default()));
        for plugin in &registry.plugins {
            plugin.retire().await;
        }
    }
}

/// Loads every script of `settings.dir` in a throwaway VM and returns `(file, error)` for
/// each that fails (`rtgate --check`). Nothing is served.
pub async fn check_dir(settings: &PluginSettings) -> Vec<(String, String)> {
    let metrics = Arc::new(Metrics::default());
    let hub = Arc::new(Hub::new(metrics.clone(), crate::history::History::disabled(metrics.clone()), usize::MAX));
    let sanitizer = Arc::new(crate::sanitize::Sanitizer::new(&crate::config::Settings::defaults().sanitize));
    // Nothing is served: output (there is none while loading) goes nowhere.
    let (output, _) = tokio::sync::mpsc::channel(1);
    let broker: Arc<dyn Broker> = Arc::new(crate::hub::LocalBroker(hub.clone()));
    let host = Arc::new(Host {
        hub,
        broker,
        output,
        metrics,
        sanitizer,
        settings: settings.clone(),
        allow_global_chat: false,
    });
    let scripts = match read_scripts(&settings.dir) {
        Ok(scripts) => scripts,
        Err(e) => return vec![(settings.dir.display().to_string(), e.to_string())],
    };
    let mut failures = Vec::new();
    let mut loaded = Vec::new();
    for script in scripts {
        match spawn(&host, &script, None).await {
            Ok(plugin) => loaded.push(plugin),
            Err(e) => failures.push((script.file.display().to_string(), e)),
        }
    }
    if let Err(e) = build_registry(loaded.clone()) {
        failures.push((settings.dir.display().to_string(), e.to_string()));
    }
    for plugin in loaded {
        plugin.retire().await;
    }
    failures
}

fn read_scripts(dir: &Path) -> Result<Vec<Script>, PluginError> {
    if !dir.exists() {
        tracing::warn!(dir = %dir.display(), "plugin directory not found; using the built-in plugins");
        return Ok(BUILT_IN
            .iter()
            .map(|(file, source)| Script {
                name: Arc::from(file.trim_end_matches(".lua")),
                file: PathBuf::from(file),
                source: source.to_string(),
            })
            .collect());
    }
    let err = |source| PluginError::Dir { dir: dir.to_path_buf(), source };
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(err)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "lua") && p.is_file())
        .collect();
    // Sorted, so that loading (and its log) is the same on every start.
    paths.sort();
    let mut scripts = Vec::new();
    for path in paths {
        match std::fs::read_to_string(&path) {
            Ok(source) => scripts.push(Script { name: plugin_name(&path), file: path, source }),
            Err(e) => tracing::error!(file = %path.display(), "plugin not loaded: {e}"),
        }
    }
    Ok(scripts)
}

fn plugin_name(path: &Path) -> Arc<str> {
    Arc::from(path.file_stem().map(|s| s.to_string_lossy()).unwrap_or_default().as_ref())
}

/// Starts a worker thread for `script` and waits until its top level has run.
async fn spawn(
    host: &Arc<Host>,
    script: &Script,
    state: Option<oneshot::Receiver<Option<Value>>>,
) -> Result<Arc<Plugin>, String> {
    let (jobs, queue) = mpsc::channel();
    let (loaded_tx, loaded) = oneshot::channel();
    let pending = Arc::new(AtomicUsize::new(0));
    let queued = Arc::new(AtomicUsize::new(0));
    // A reloaded version waits for its predecessor's state before it may run anything.
    let ready = Arc::new(AtomicBool::new(state.is_none()));
    let outlet = Arc::new(Outlet { host: host.clone(), unsent: Arc::new(AtomicUsize::new(0)) });
    let unsent = outlet.unsent.clone();
    let successor: StdArc<OnceLock<Successor>> = StdArc::default();
    let forward = successor.clone();
    let file_name = script.file.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default();
    let (name, source) = (script.name.clone(), script.source.clone());
    let (p, q, r) = (pending.clone(), queued.clone(), ready.clone());
    std::thread::Builder::new()
        .name(format!("plugin-{}", script.name))
        .spawn(move || match worker::load(&outlet, &name, &file_name, &source) {
            Ok(vm) => {
                let registered = vm.registered();
                let core = Arc::new(parking_lot::Mutex::new(Core::new(outlet, name, (file_name, source), vm)));
                let _ = loaded_tx.send(Ok((registered, core.clone())));
                Worker { core, pending: p, queued: q, ready: r }.run(queue, state, forward);
            }
            Err(e) => {
                let _ = loaded_tx.send(Err(e));
            }
        })
        .map_err(|e| format!("cannot start a thread: {e}"))?;
    let (registered, core) = loaded.await.map_err(|_| "the plugin thread stopped while loading".to_string())??;
    let counts = registered.events.iter().map(|e| (Arc::from(e.as_str()), Default::default())).collect();
    Ok(Arc::new(Plugin {
        name: script.name.clone(),
        file: script.file.clone(),
        registered,
        source: script.source.clone(),
        core,
        jobs,
        pending,
        queued,
        unsent,
        ready,
        retired: AtomicBool::new(false),
        queue: host.settings.queue,
        counts,
        successor,
    }))
}

fn build_registry(plugins: Vec<Arc<Plugin>>) -> Result<Registry, PluginError> {
    let mut registry = Registry::default();
    for plugin in plugins {
        for kind in &plugin.registered.events {
            let kind: Arc<str> = Arc::from(kind.as_str());
            if let Some(first) = registry.by_event.get(&kind) {
                return Err(PluginError::Duplicate {
                    kind: kind.to_string(),
                    first: first.file.display().to_string(),
                    second: plugin.file.display().to_string(),
                });
            }
            registry.by_event.insert(kind, plugin.clone());
        }
        registry.plugins.push(plugin);
    }
    Ok(registry)
}
