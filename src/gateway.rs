//! The gateway as a whole: builds the shared state, binds the listener, runs the background
//! tasks, and shuts everything down in order.
//!
//! [`Gateway`] is the state every session and HTTP handler shares; [`start`] returns a
//! [`Running`] handle that tests and `main` use alike, so the tests exercise exactly the
//! server the binary runs.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use tokio::net::TcpListener;
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;

use crate::auth::Auth;
use crate::config::{AuthMode, ConfigError, MetricsListen, Settings};
use crate::conn::CloseReason;
use crate::history::History;
use crate::hub::{Broker, Hub, LocalBroker};
use crate::listener::{self, Policy};
use crate::metrics::Metrics;
use crate::plugins::{Host, PluginError, PluginHost};
use crate::ratelimit::{EventLimits, IpLimits};
use crate::sanitize::Sanitizer;

pub struct Gateway {
    pub settings: Settings,
    pub hub: Arc<Hub>,
    pub plugins: PluginHost,
    pub metrics: Arc<Metrics>,
    pub history: Arc<History>,
    pub auth: Auth,
    pub sanitizer: Arc<Sanitizer>,
    pub limits: EventLimits,
    pub ip_limits: Arc<IpLimits>,
    /// Time base for per-connection heartbeat bookkeeping.
    pub epoch: Instant,
    sessions: Sessions,
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error(transparent)]
    Plugins(#[from] PluginError),
    #[error(transparent)]
    Config(#[from] ConfigError),
}

/// Counts live sessions so that shutdown can wait for them.
#[derive(Default)]
struct Sessions {
    live: AtomicUsize,
    idle: Notify,
}

/// Held by a session task for its lifetime.
pub struct SessionGuard(Arc<Gateway>);

impl Drop for SessionGuard {
    fn drop(&mut self) {
        if self.0.sessions.live.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.sessions.idle.notify_waiters();
        }
    }
}

impl Gateway {
    pub fn session_guard(self: &Arc<Self>) -> SessionGuard {
        self.sessions.live.fetch_add(1, Ordering::AcqRel);
        SessionGuard(self.clone())
    }

    async fn sessions_finished(&self) {
        loop {
            let idle = self.sessions.idle.notified();
            if self.sessions.live.load(Ordering::Acquire) == 0 {
                return;
            }
            idle.await;
        }
    }
}

/// A started gateway.
pub struct Running {
    pub addr: SocketAddr,
    /// Where `/metrics` is served when it has a listener of its own.
    pub metrics_addr: Option<SocketAddr>,
    pub gateway: Arc<Gateway>,
    stop: Option<watch::Sender<bool>>,
    /// The accept loops (the gateway's address, and the metrics listener if any).
    servers: Vec<JoinHandle<()>>,
    /// Tasks that could start new work (heartbeats, plugin reloads): stopped first.
    first_to_stop: Vec<JoinHandle<()>>,
    /// Tasks that finish work (plugin output, history): stopped last.
    background: Vec<JoinHandle<()>>,
}

pub async fn start(settings: Settings) -> Result<Running, StartError> {
    let auth = Auth::new(&settings.auth)?;
    let sanitizer = Arc::new(Sanitizer::new(&settings.sanitize));
    let bind = settings.server.bind;
    let listener = TcpListener::bind(bind).await.map_err(|source| StartError::Bind { addr: bind, source })?;
    let addr = listener.local_addr().map_err(|source| StartError::Bind { addr: bind, source })?;
    let metrics_listener = match settings.metrics.listen {
        MetricsListen::Separate(at) => {
            Some(TcpListener::bind(at).await.map_err(|source| StartError::Bind { addr: at, source })?)
        }
        MetricsListen::Main | MetricsListen::Off => None,
    };

    let metrics = Arc::new(Metrics::default());
    let history = History::open(settings.history.clone(), metrics.clone()).await;
    let hub = Arc::new(Hub::new(metrics.clone(), history.clone(), settings.limits.max_members_per_room));
    let mut background = {
        let hub = hub.clone();
        history.start_tasks(Arc::new(move |room, frame, exclude| {
            hub.deliver(room, frame, exclude);
        }))
    };
    let broker: Arc<dyn Broker> = Arc::new(LocalBroker(hub.clone()));
    let (output, plugin_output) = tokio::sync::mpsc::channel(crate::plugins::OUTPUT_QUEUE);
    background.push(tokio::spawn(crate::plugins::deliver_output(plugin_output, hub.clone(), broker.clone())));
    let host = Arc::new(Host {
        hub: hub.clone(),
        broker,
        output,
        metrics: metrics.clone(),
        sanitizer: sanitizer.clone(),
        settings: settings.plugins.clone(),
        allow_global_chat: settings.global_chat_allowed(),
    });
    let plugins = PluginHost::start(host).await?;
    let gateway = Arc::new(Gateway {
        limits: EventLimits::new(&settings.rate_limits),
        ip_limits: Arc::new(IpLimits::new(&settings.limits)),
        settings,
        hub,
        plugins,
        metrics,
        history,
        auth,
        sanitizer,
        epoch: Instant::now(),
        sessions: Sessions::default(),
    });

    let heartbeat = {
        let gw = gateway.clone();
        tokio::spawn(async move {
            let hb = &gw.settings.heartbeat;
            let mut tick = tokio::time::interval(hb.interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tick.tick().await;
                gw.hub.heartbeat(hb.timeout, gw.settings.auth.leeway_seconds);
                gw.limits.sweep();
                gw.ip_limits.sweep();
                release_free_memory();
            }
        })
    };

    let watching = gateway.plugins.watch();
    let watcher = {
        let gw = gateway.clone();
        tokio::spawn(async move {
            if let Some(watching) = watching {
                gw.plugins.reload_on_change(watching).await;
            }
        })
    };

    let first_to_stop = vec![heartbeat, watcher];

    let (stop, stopped) = watch::channel(false);
    let policy = |limits| Policy {
        limits,
        header_timeout: gateway.settings.server.header_timeout,
        metrics: gateway.metrics.clone(),
    };
    let until_stopped = |mut stopped: watch::Receiver<bool>| async move {
        let _ = stopped.wait_for(|stop| *stop).await;
    };
    let mut servers = vec![tokio::spawn(listener::serve(
        listener,
        crate::http::routes(gateway.clone()),
        policy(Some(gateway.ip_limits.clone())),
        until_stopped(stopped.clone()),
    ))];
    let metrics_addr = match metrics_listener {
        Some(metrics) => {
            let metrics_addr = metrics.local_addr().map_err(|source| StartError::Bind { addr, source })?;
            servers.push(tokio::spawn(listener::serve(
                metrics,
                crate::http::metrics_routes(gateway.clone()),
                policy(None),
                until_stopped(stopped),
            )));
            tracing::info!(addr = %metrics_addr, "metrics on http://{metrics_addr}/metrics");
            Some(metrics_addr)
        }
        None => None,
    };
    let m = &gateway.settings.metrics;
    if gateway.settings.auth.mode == AuthMode::Jwt && m.listen == MetricsListen::Main && m.key.is_empty() {
        tracing::warn!(
            "GET /metrics is readable by anyone who can reach the gateway: set metrics.listen to a \
             separate (loopback) address, or metrics.key"
        );
    }
    tracing::info!(%addr, "rtgate listening on ws://{addr}/ws (and ws://{addr}/)");
    Ok(Running { addr, metrics_addr, gateway, stop: Some(stop), servers, first_to_stop, background })
}

/// Hands memory freed since the last call back to the operating system. glibc keeps freed
/// chunks in per-thread arenas; after a burst of connections has come and gone, that can
/// look like growth that never ends. Once per heartbeat is cheap.
fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free memory; it is safe to call at any time.
    unsafe {
        libc::malloc_trim(0);
    }
}

impl Running {
    /// Stops accepting, closes every connection with 1001, waits up to
    /// `server.shutdown_grace` for sessions to end, then stops the plugins.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(true);
        }
        let gw = &self.gateway;
        gw.hub.close_all(CloseReason::Shutdown);
        let grace = gw.settings.server.shutdown_grace;
        if tokio::time::timeout(grace, gw.sessions_finished()).await.is_err() {
            tracing::warn!("shutdown: some connections did not close within {grace:?}");
        }
        let _ = tokio::time::timeout(grace, futures_util::future::join_all(&mut self.servers)).await;
        for task in &self.first_to_stop {
            task.abort();
        }
        // Plugins may still publish while they hand over state (the output task delivers
        // it); then history commits what is queued; only then do the background tasks go.
        gw.plugins.shutdown().await;
        gw.history.flush().await;
        for task in &self.background {
            task.abort();
        }
        tracing::info!("rtgate stopped");
    }
}
