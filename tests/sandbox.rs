//! The plugin sandbox: runaway, greedy, broken and nosy scripts loaded beside the bundled
//! plugins, each shown to cost only its own event while the gateway keeps serving chat.

mod common;

use std::time::Duration;

use common::*;
use serde_json::json;

const RUNAWAY: &str = r#"
rtgate.on("spin", function() while true do end end)
rtgate.on("spin_pcall", function()
  while true do pcall(function() while true do end end) end
end)
rtgate.on("spin_catch", function()
  -- Swallows the interrupt and returns normally: still a timeout.
  pcall(function() while true do end end)
end)
rtgate.on("spin_coroutine", function()
  local co = coroutine.create(function() while true do end end)
  coroutine.resume(co)
end)
rtgate.on("spin_wrap", function()
  coroutine.wrap(function() while true do coroutine.yield() end end)()
  while true do end
end)
rtgate.on("spin_pattern", function()
  local s = string.rep("a", 200000)
  for i = 1, 1000 do string.find(s, ".-.-.-.-.-.-.-.-.-b") end
end)
rtgate.on("spin_recurse", function()
  local function f(n) return f(n + 1) + 1 end
  return f(1)
end)
rtgate.on("ok", function(client) rtgate.send(client.id, { type = "ok" }) end)
"#;

const GREEDY: &str = r#"
hoard = {}
rtgate.on("bomb", function()
  -- Each entry is a distinct ~63 KB string built with no large temporary, so that what
  -- the loop holds when it hits the limit is nearly all of the limit, not a share that
  -- depends on how far the collector lagged behind.
  while true do hoard[#hoard + 1] = string.rep(string.format("%6d,", #hoard), 9000) end
end)
rtgate.on("bomb_local", function()
  local t = {}
  while true do t[#t + 1] = string.rep("y", 65536) .. tostring(#t) end
end)
rtgate.on("alive", function(client) rtgate.send(client.id, { type = "alive", hoard = #hoard }) end)
"#;

const NOSY: &str = r#"
rtgate.on("probe", function(client)
  local seen = {}
  for _, name in ipairs({ "io", "require", "loadstring", "load", "dofile", "loadfile",
                          "debug", "getfenv", "setfenv", "package", "ffi", "jit", "newproxy" }) do
    seen[name] = type(_G[name]) ~= "nil"
  end
  seen.os_execute = os.execute ~= nil
  seen.os_remove = os.remove ~= nil
  seen.os_getenv = os.getenv ~= nil
  seen.string_dump = string.dump ~= nil
  -- Built-ins and the host API are read-only.
  seen.patch_string = pcall(function() string.rep = nil end)
  seen.patch_rtgate = pcall(function() rtgate.send = nil end)
  rtgate.send(client.id, { type = "probed", seen = seen })
end)
rtgate.on("late_register", function()
  rtgate.on("sneaky", function() end)
end)
"#;

async fn sandbox_gateway(extra: &[(&str, &str)], tweak: impl FnOnce(&mut rtgate::Settings)) -> (Gw, tempfile::TempDir) {
    let dir = plugin_dir(extra);
    let mut s = settings();
    s.plugins.dir = dir.path().to_path_buf();
    tweak(&mut s);
    (Gw::start(s).await, dir)
}

/// Chat between two fresh clients works right now.
async fn chat_works(gw: &Gw, room: &str) {
    let mut a = gw.client().await;
    let mut b = gw.client().await;
    a.join(room).await;
    b.join(room).await;
    a.expect("user_joined").await;
    b.send(json!({"type": "chat", "room": room, "message": "ping"})).await;
    assert_eq!(a.expect("chat_message").await["message"], "ping");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runaway_handlers_are_stopped_and_chat_carries_on() {
    let (gw, _dir) = sandbox_gateway(&[("runaway.lua", RUNAWAY)], |s| {
        s.plugins.time_budget = Duration::from_millis(50);
    })
    .await;
    let mut c = gw.client().await;
    for kind in ["spin", "spin_pcall", "spin_catch", "spin_coroutine", "spin_wrap", "spin_pattern", "spin_recurse"] {
        c.send(json!({"type": kind})).await;
        // While that plugin is stuck, chat is served.
        chat_works(&gw, kind).await;
        let err = c.expect("error").await;
        assert_eq!(err["code"], "plugin_error", "{kind}: {err}");
    }
    // The runaway plugin itself still answers afterwards.
    c.send(json!({"type": "ok"})).await;
    c.expect("ok").await;
    let (_, _, body) = http_get(gw.addr, "/healthz", &[]).await;
    assert!(body.contains("\"ok\""), "{body}");
}

/// A quick plugin's events run on the runtime worker that received them; once a call ran
/// past its budget, the plugin's events go to its own thread, where a runaway script
/// occupies nothing but that thread.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_that_ran_long_is_kept_on_its_own_thread() {
    let (gw, _dir) = sandbox_gateway(&[("runaway.lua", RUNAWAY)], |s| {
        s.plugins.time_budget = Duration::from_millis(50);
    })
    .await;
    let on_thread = "rtgate_plugin_events_on_thread_total";
    let mut c = gw.client().await;
    for _ in 0..3 {
        c.send(json!({"type": "ok"})).await;
        c.expect("ok").await;
    }
    assert_eq!(gw.metric(on_thread).await, 0.0);
    c.expect_error(json!({"type": "spin"}), "plugin_error").await;
    let before = gw.metric(on_thread).await;
    for _ in 0..3 {
        c.send(json!({"type": "ok"})).await;
        c.expect("ok").await;
    }
    assert_eq!(gw.metric(on_thread).await, before + 3.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_memory_bomb_hits_the_limit_and_chat_carries_on() {
    let (gw, _dir) = sandbox_gateway(&[("greedy.lua", GREEDY)], |s| {
        s.plugins.memory_limit_mb = 16;
        s.plugins.time_budget = Duration::from_secs(5);
    })
    .await;
    let mut c = gw.client().await;
    for kind in ["bomb_local", "bomb", "bomb_local"] {
        c.expect_error(json!({"type": kind}), "plugin_error").await;
        chat_works(&gw, kind).await;
    }
    // The global hoard wedged the VM at its limit: it was restarted with fresh state.
    c.send(json!({"type": "alive"})).await;
    assert_eq!(c.expect("alive").await["hoard"], 0);
}

#[tokio::test]
async fn scripts_cannot_reach_outside_the_sandbox() {
    let (gw, _dir) = sandbox_gateway(&[("nosy.lua", NOSY)], |_| {}).await;
    let mut c = gw.client().await;
    c.send(json!({"type": "probe"})).await;
    let seen = c.expect("probed").await["seen"].clone();
    for (name, present) in seen.as_object().unwrap() {
        assert_eq!(present, &json!(false), "{name} should not be available: {seen}");
    }
    c.expect_error(json!({"type": "late_register"}), "plugin_error").await;
    c.expect_error(json!({"type": "sneaky"}), "unknown_type").await;
}

#[tokio::test]
async fn a_script_that_fails_to_load_is_skipped_and_the_rest_run() {
    let (gw, _dir) = sandbox_gateway(
        &[
            ("broken.lua", "rtgate.on(\"broken\", function(\n  this is not lua\nend)\n"),
            ("throws.lua", "error(\"refusing to load\")\n"),
            ("spins_at_load.lua", "while true do end\n"),
        ],
        |s| s.plugins.time_budget = Duration::from_millis(50),
    )
    .await;
    let mut c = gw.client().await;
    c.expect_error(json!({"type": "broken"}), "unknown_type").await;
    chat_works(&gw, "after-broken").await;
    let (_, _, body) = http_get(gw.addr, "/healthz", &[]).await;
    for name in ["broken", "throws", "spins_at_load"] {
        assert!(!body.contains(&format!("\"{name}\"")), "{name} should not be loaded: {body}");
    }
}

#[tokio::test]
async fn a_load_error_names_the_file_and_line() {
    let dir = plugin_dir(&[("broken.lua", "-- line 1\nrtgate.on(\"x\", function()\n  local = 3\nend)\n")]);
    let mut s = settings();
    s.plugins.dir = dir.path().to_path_buf();
    let errors = rtgate::plugins::check_dir(&s.plugins).await;
    let broken = errors.iter().find(|(file, _)| file.ends_with("broken.lua")).expect("broken.lua reported");
    assert!(broken.1.contains("broken.lua:3"), "{broken:?}");
    assert_eq!(errors.len(), 1, "only broken.lua fails: {errors:?}");
}

#[tokio::test]
async fn two_plugins_claiming_one_event_type_stop_start_up_naming_both() {
    let dir = plugin_dir(&[("zz_mine.lua", "rtgate.on(\"chat\", function() end)\n")]);
    let mut s = settings();
    s.plugins.dir = dir.path().to_path_buf();
    let err = match rtgate::start(s).await {
        Ok(_) => panic!("start-up must fail"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("chat.lua") && err.contains("zz_mine.lua") && err.contains("\"chat\""), "{err}");
}
