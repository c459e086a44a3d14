//! Hot reload: plugin files added, edited or deleted take effect without a restart and
//! without dropping a connection.
//!
//! A watcher (inotify, through `notify`) only signals "something changed"; after a short
//! quiet period the directory is rescanned and compared with what runs. A changed script is
//! loaded on a fresh worker first, so a version that fails to compile or claims another
//! plugin's event type is refused and the running one stays. When the new version is
//! accepted, the routing table is swapped, the old worker finishes what was queued for it,
//! exports its state (`rtgate.on_state`) and stops, and the new worker imports that state
//! before it runs anything: no event is handled twice, none is lost, and they stay in order.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;

use tokio::sync::{Notify, oneshot};

use super::{Plugin, PluginHost, build_registry, read_scripts, spawn};

/// A live directory watch; dropping it stops the watching.
pub struct Watching {
    _watcher: notify::RecommendedWatcher,
    changed: Arc<Notify>,
}

/// A worker replaced by a new version, and where its state goes.
struct Retiring {
    old: Arc<Plugin>,
    state: Option<oneshot::Sender<Option<serde_json::Value>>>,
}

impl PluginHost {
    /// Starts watching the plugin directory; `None` if hot reload is off or the directory
    /// does not exist (the built-in plugins are running). The watch is in place when this
    /// returns, so no change made after start-up can be missed.
    pub fn watch(&self) -> Option<Watching> {
        use notify::{RecursiveMode, Watcher};
        let settings = &self.host.settings;
        if !settings.hot_reload || !settings.dir.is_dir() {
            return None;
        }
        let changed = Arc::new(Notify::new());
        let signal = changed.clone();
        let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
            // Reading a file is an event too (our own rescans read them all): only changes count.
            let changed = |e: &notify::Event| !matches!(e.kind, notify::EventKind::Access(_));
            if event.is_ok_and(|e| changed(&e) && e.paths.iter().any(|p| p.extension().is_some_and(|x| x == "lua"))) {
                signal.notify_one();
            }
        });
        let result = watcher.and_then(|mut w| w.watch(&settings.dir, RecursiveMode::NonRecursive).map(|()| w));
        match result {
            Ok(watcher) => {
                tracing::info!(dir = %settings.dir.display(), "watching plugins for changes");
                Some(Watching { _watcher: watcher, changed })
            }
            Err(e) => {
                tracing::warn!("hot reload disabled: cannot watch {}: {e}", settings.dir.display());
                None
            }
        }
    }

    /// Reloads on every change signalled by `watching`, until the gateway stops.
    pub async fn reload_on_change(&self, watching: Watching) {
        loop {
            watching.changed.notified().await;
            // An editor's save is several events (truncate, write, rename); wait for quiet.
            loop {
                tokio::select! {
                    _ = watching.changed.notified() => continue,
                    _ = tokio::time::sleep(self.host.settings.reload_debounce) => break,
                }
            }
            self.rescan().await;
        }
    }

    /// Brings the running plugins in line with the directory.
    pub async fn rescan(&self) {
        let scripts = match read_scripts(&self.host.settings.dir) {
            Ok(scripts) => scripts,
            Err(e) => {
                tracing::error!("reload: {e}");
                self.reloads.send_modify(|n| *n += 1);
                return;
            }
        };
        let current = self.registry.load_full();
        let mut next: Vec<Arc<Plugin>> = Vec::new();
        let mut started: Vec<Arc<Plugin>> = Vec::new();
        let mut retiring: Vec<Retiring> = Vec::new();
        let mut changed = false;
        let on_disk: HashSet<&PathBuf> = scripts.iter().map(|s| &s.file).collect();

        for script in &scripts {
            let old = current.plugins.iter().find(|p| p.file == script.file);
            match old {
                Some(old) if old.source == script.source => next.push(old.clone()),
                Some(old) => {
                    changed = true;
                    let (state_tx, state_rx) = oneshot::channel();
                    match spawn(&self.host, script, Some(state_rx)).await {
                        Ok(new) => {
                            started.push(new.clone());
                            next.push(new);
                            retiring.push(Retiring { old: old.clone(), state: Some(state_tx) });
                        }
                        Err(e) => {
                            tracing::error!(file = %script.file.display(), "reload failed, the previous version keeps running: {e}");
                            next.push(old.clone());
                        }
                    }
                }
                None => {
                    changed = true;
                    match spawn(&self.host, script, None).await {
                        Ok(new) => {
                            started.push(new.clone());
                            next.push(new);
                        }
                        Err(e) => tracing::error!(file = %script.file.display(), "plugin not loaded: {e}"),
                    }
                }
            }
        }
        for old in current.plugins.iter().filter(|p| !on_disk.contains(&p.file)) {
            changed = true;
            retiring.push(Retiring { old: old.clone(), state: None });
        }
        if !changed {
            return;
        }

        match build_registry(next) {
            Ok(registry) => {
                self.registry.store(Arc::new(registry));
                for plugin in &started {
                    let verb = if retiring.iter().any(|r| r.old.file == plugin.file) { "reloaded" } else { "loaded" };
                    tracing::info!(plugin = %plugin.name, events = ?plugin.registered.events, "plugin {verb}");
                }
                for Retiring { old, state } in retiring {
                    if let Some(new) = started.iter().find(|p| p.file == old.file) {
                        let _ = old.successor.set(new.successor());
                    } else {
                        tracing::info!(plugin = %old.name, "plugin removed");
                    }
                    let exported = old.retire().await;
                    if let Some(state) = state {
                        let _ = state.send(exported);
                    }
                }
            }
            Err(e) => {
                // Refused as a whole: the running set is untouched. Workers started for it
                // stop (a replacement's state channel closes; a new one is retired).
                tracing::error!("reload refused, the previous plugins keep running: {e}");
                drop(retiring);
                for plugin in started {
                    if !current.plugins.iter().any(|p| p.file == plugin.file) {
                        plugin.retire().await;
                    }
                }
            }
        }
        self.reloads.send_modify(|n| *n += 1);
    }
}
