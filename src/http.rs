//! HTTP: the warp routes, the WebSocket upgrade, and the headers every response carries.
//!
//! The upgrade is done here rather than with `warp::ws()` because warp does not expose
//! tungstenite's read buffer size, and the default 128 KiB per connection would dominate
//! the memory of a gateway holding many idle sockets. Checks that can refuse a client
//! (origin; later authentication and per-IP caps) run before the 101, so a refused client
//! gets a plain HTTP error and never a socket.

use std::convert::Infallible;
use std::sync::Arc;

use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use serde::Serialize;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use warp::http::{HeaderMap, HeaderValue, StatusCode, header};
use warp::reply::Response;
use warp::{Filter, Rejection, Reply};

use std::sync::atomic::Ordering;

use crate::auth::{self, Auth, AuthError, TokenSource};
use crate::config::{AuthMode, MetricsListen};
use crate::conn::{Bounds, Conn, Identity, Profile, new_client_id};
use crate::gateway::Gateway;
use crate::history::{HistoryError, Page};
use crate::listener::Peer;
use crate::protocol::RoomName;
use crate::ratelimit::Budget;

/// `Content-Security-Policy` for everything we serve: scripts, styles and connections
/// from this origin only, no inline script, never framed.
const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
    connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'";

/// tungstenite's read buffer is allocated up front for every connection; frames larger than
/// this are still read, in several chunks.
const READ_BUFFER: usize = 1024;

/// The bundled web client, compiled in so that the binary serves it from anywhere.
const WEB: &[(&str, &str, &str)] = &[
    ("", "text/html; charset=utf-8", include_str!("../web/index.html")),
    ("index.html", "text/html; charset=utf-8", include_str!("../web/index.html")),
    ("app.js", "text/javascript; charset=utf-8", include_str!("../web/app.js")),
    ("rtgate.js", "text/javascript; charset=utf-8", include_str!("../web/rtgate.js")),
    ("style.css", "text/css; charset=utf-8", include_str!("../web/style.css")),
];

fn static_file(path: &str) -> Option<Response> {
    let (_, content_type, body) = WEB.iter().find(|(name, _, _)| *name == path)?;
    let mut res = warp::reply::with_header(*body, header::CONTENT_TYPE, *content_type).into_response();
    res.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    Some(res)
}

/// Every route of the gateway's address. `/metrics` is among them only when
/// `metrics.listen` is "main"; [`metrics_routes`] serves it on a listener of its own.
pub fn routes(gw: Arc<Gateway>) -> impl Filter<Extract = (impl Reply,), Error = Infallible> + Clone {
    let gw_filter = {
        let gw = gw.clone();
        warp::any().map(move || gw.clone())
    };
    // HEAD wherever GET is served: load balancers and uptime checks use it (hyper sends
    // the head of the GET response, without the body).
    let read = || warp::get().or(warp::head()).unify();
    let ws_path = warp::path::end().or(warp::path("ws").and(warp::path::end())).unify();
    let upgrade = warp::get()
        .and(ws_path)
        .and(warp::header::headers_cloned())
        .and(warp::query::raw().or(warp::any().map(String::new)).unify())
        .and(warp::ext::optional::<OnUpgrade>())
        .and(warp::ext::optional::<Peer>())
        .and(gw_filter.clone())
        .and_then(upgrade);
    let healthz = read().and(warp::path!("healthz")).and(gw_filter.clone()).map(healthz);
    let main_metrics = gw.settings.metrics.listen == MetricsListen::Main;
    let metrics = warp::any()
        .and_then(move || async move { if main_metrics { Ok(()) } else { Err(warp::reject::not_found()) } })
        .untuple_one()
        .and(metrics_route(gw.clone()));
    let history = read()
        .and(warp::path!("rooms" / String / "history"))
        .and(warp::query::raw().or(warp::any().map(String::new)).unify())
        .and(warp::header::headers_cloned())
        .and(gw_filter.clone())
        .then(history);
    // Path first: a mismatch must read as "not found", not "method not allowed".
    let preflight = warp::path!("rooms" / String / "history")
        .and(warp::options())
        .and(warp::header::headers_cloned())
        .and(gw_filter.clone())
        .map(|_room: String, headers: HeaderMap, gw: Arc<Gateway>| preflight(&gw, &headers));
    // CORS for the HTTP API, from the same list of origins as WebSocket upgrades.
    let api = healthz.or(history).unify().and(warp::header::headers_cloned()).and(gw_filter.clone()).map(
        |mut res: Response, headers: HeaderMap, gw: Arc<Gateway>| {
            if let Some(origin) = allowed_origin(&gw, &headers) {
                res.headers_mut().insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
                res.headers_mut().insert(header::VARY, HeaderValue::from_static("Origin"));
            }
            res
        },
    );
    let page = read().and(warp::path::tail()).and_then(|tail: warp::path::Tail| async move {
        static_file(tail.as_str()).ok_or_else(warp::reject::not_found)
    });
    upgrade
        .or(api)
        .or(metrics)
        .or(preflight)
        .or(page)
        .recover(rejection)
        .with(warp::reply::with::headers(security_headers()))
}

/// `/metrics` alone, for its own listener (`metrics.listen = "HOST:PORT"`).
pub fn metrics_routes(gw: Arc<Gateway>) -> impl Filter<Extract = (impl Reply,), Error = Infallible> + Clone {
    metrics_route(gw).recover(rejection).with(warp::reply::with::headers(security_headers()))
}

/// `GET /metrics`, refused without the right `Authorization: Bearer` when `metrics.key`
/// is set.
fn metrics_route(gw: Arc<Gateway>) -> impl Filter<Extract = (Response,), Error = Rejection> + Clone {
    warp::get()
        .or(warp::head())
        .unify()
        .and(warp::path!("metrics"))
        .and(warp::header::optional::<String>("authorization"))
        .map(move |authorization: Option<String>| {
            let key = &gw.settings.metrics.key;
            if !key.is_empty() {
                let given = authorization.as_deref().and_then(|a| a.strip_prefix("Bearer ")).unwrap_or("");
                if !crate::auth::same_secret(given.as_bytes(), key.as_bytes()) {
                    return error_reply(StatusCode::UNAUTHORIZED, "unauthorized", "a metrics key is required");
                }
            }
            let body = gw.metrics.render(&gw.plugins.event_counts());
            warp::reply::with_header(body, header::CONTENT_TYPE, "text/plain; version=0.0.4").into_response()
        })
}

/// The headers every response carries (also those hyper writes itself, see `listener`).
pub(crate) fn security_headers() -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    // "0" turns off the legacy XSS auditor, which itself enabled attacks; CSP is the
    // protection that counts (OWASP's current advice).
    h.insert(header::X_XSS_PROTECTION, HeaderValue::from_static("0"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    h.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
    h
}

/// The JSON body of every HTTP error: `{"error": code, "message": text}`.
pub fn error_reply(status: StatusCode, code: &str, message: &str) -> Response {
    #[derive(Serialize)]
    struct Body<'a> {
        error: &'a str,
        message: &'a str,
    }
    warp::reply::with_status(warp::reply::json(&Body { error: code, message }), status).into_response()
}

async fn rejection(err: Rejection) -> Result<Response, Infallible> {
    Ok(if err.is_not_found() {
        error_reply(StatusCode::NOT_FOUND, "not_found", "Not found")
    } else if err.find::<warp::reject::MethodNotAllowed>().is_some() {
        error_reply(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", "Method not allowed")
    } else {
        error_reply(StatusCode::BAD_REQUEST, "bad_request", "Bad request")
    })
}

fn header_has_token(headers: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .any(|v| v.to_str().is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token))))
}

async fn upgrade(
    headers: HeaderMap,
    query: String,
    on_upgrade: Option<OnUpgrade>,
    peer: Option<Peer>,
    gw: Arc<Gateway>,
) -> Result<Response, Rejection> {
    let remote = peer.as_ref().map(|p| p.addr);
    // Not an upgrade at all: let `/` fall through to the page.
    if !header_has_token(&headers, header::UPGRADE, "websocket") {
        return Err(warp::reject::not_found());
    }
    let bad = |message| Ok(error_reply(StatusCode::BAD_REQUEST, "bad_upgrade", message));
    if !header_has_token(&headers, header::CONNECTION, "upgrade") {
        return bad("Connection: upgrade is required");
    }
    if headers.get(header::SEC_WEBSOCKET_VERSION).is_none_or(|v| v != "13") {
        return bad("Sec-WebSocket-Version: 13 is required");
    }
    let Some(key) = headers.get(header::SEC_WEBSOCKET_KEY) else {
        return bad("Sec-WebSocket-Key is required");
    };
    let Some(on_upgrade) = on_upgrade else {
        return bad("this connection cannot be upgraded");
    };
    let refuse = |status: StatusCode, code: &str, why: &str| {
        gw.metrics.upgrades_refused.fetch_add(1, Ordering::Relaxed);
        // The reason only: a token, even a bad one, never reaches the log.
        tracing::info!(peer = ?remote, "upgrade refused: {why}");
        Ok(error_reply(status, code, why))
    };
    // The connection was admitted under the per-IP caps when it was accepted; the socket
    // keeps its slot.
    let slot = peer.and_then(|p| p.slot);
    if let Err(refusal) = check_origin(&gw, &headers) {
        return refuse(StatusCode::FORBIDDEN, "forbidden_origin", refusal);
    }

    let id = new_client_id();
    let limits = &gw.settings.limits;
    let mut subprotocol = false;
    let (user_id, profile) = match gw.auth.mode() {
        AuthMode::Anonymous => {
            let chosen = query_param(&query, "name").and_then(|n| auth::clean_name(&n, limits.max_name_chars));
            let name: Arc<str> = match chosen {
                Some(name) => gw.sanitizer.clean(&name).into(),
                None => guest_name(&id),
            };
            (id.clone(), Profile::guest(name))
        }
        AuthMode::Jwt => {
            let Some((token, source)) = Auth::token_from(&headers, &query) else {
                return refuse(StatusCode::UNAUTHORIZED, "unauthorized", &AuthError::Missing.to_string());
            };
            match gw.auth.verify(&token, limits.max_name_chars) {
                Ok((user, profile)) => {
                    subprotocol = source == TokenSource::Subprotocol;
                    let username = gw.sanitizer.clean(&profile.username).into();
                    (user, Profile { username, ..profile })
                }
                Err(e) => return refuse(StatusCode::UNAUTHORIZED, "unauthorized", &e.to_string()),
            }
        }
    };
    let budget = match gw.auth.mode() {
        AuthMode::Anonymous => Budget::guest(),
        AuthMode::Jwt => Budget::User(user_id.clone()),
    };
    let identity = Identity::new(user_id, profile);
    let bounds = Bounds { frames: limits.outbox_messages, bytes: limits.outbox_bytes };
    let conn = Arc::new(Conn::new(identity, id, budget, bounds, gw.epoch));
    let accept = derive_accept_key(key.as_bytes());
    let guard = gw.session_guard();
    let max = limits.max_frame_bytes;
    let config = WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER)
        .write_buffer_size(64 << 10)
        .max_write_buffer_size(1 << 20)
        .max_message_size(Some(max))
        .max_frame_size(Some(max));
    tokio::spawn(async move {
        let _guards = (guard, slot);
        match on_upgrade.await {
            Ok(upgraded) => {
                let ws = WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, Some(config)).await;
                crate::session::run(ws, gw, conn).await;
            }
            Err(e) => tracing::debug!("upgrade failed: {e}"),
        }
    });

    let mut res = warp::reply().into_response();
    *res.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = res.headers_mut();
    h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    // derive_accept_key yields base64, always a valid header value.
    if let Ok(accept) = HeaderValue::from_str(&accept) {
        h.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
    }
    if subprotocol {
        // A browser that offered subprotocols fails the connection unless one is chosen.
        h.insert(header::SEC_WEBSOCKET_PROTOCOL, HeaderValue::from_static(auth::BEARER_PROTOCOL));
    }
    Ok(res)
}

/// The first value of `name` in a query string, percent-decoded.
fn query_param(query: &str, name: &str) -> Option<String> {
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=')?;
        (k == name).then(|| auth::percent_decode(v))
    })
}

/// Cross-site WebSocket hijacking defence: a browser always sends `Origin`, and only the
/// configured origins may open a socket with the user's cookies.
fn check_origin(gw: &Gateway, headers: &HeaderMap) -> Result<(), &'static str> {
    let server = &gw.settings.server;
    match headers.get(header::ORIGIN).map(|o| o.to_str()) {
        None => {
            if server.allow_missing_origin {
                Ok(())
            } else {
                Err("an Origin header is required")
            }
        }
        Some(Ok(origin)) if server.allowed_origins.iter().any(|a| a == "*" || a.eq_ignore_ascii_case(origin)) => Ok(()),
        Some(_) => Err("origin not allowed"),
    }
}

fn guest_name(id: &str) -> Arc<str> {
    Arc::from(format!("guest-{}", &id[id.len() - 4..]))
}

/// The request's `Origin`, if it is one the configuration allows.
fn allowed_origin(gw: &Gateway, headers: &HeaderMap) -> Option<HeaderValue> {
    let origin = headers.get(header::ORIGIN)?;
    let text = origin.to_str().ok()?;
    gw.settings.server.allowed_origins.iter().any(|a| a == "*" || a.eq_ignore_ascii_case(text)).then(|| origin.clone())
}

fn preflight(gw: &Gateway, headers: &HeaderMap) -> Response {
    let Some(origin) = allowed_origin(gw, headers) else {
        return error_reply(StatusCode::FORBIDDEN, "forbidden_origin", "origin not allowed");
    };
    let mut res = warp::reply().into_response();
    *res.status_mut() = StatusCode::NO_CONTENT;
    let h = res.headers_mut();
    h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
    h.insert(header::ACCESS_CONTROL_ALLOW_METHODS, HeaderValue::from_static("GET"));
    h.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, HeaderValue::from_static("authorization"));
    h.insert(header::ACCESS_CONTROL_MAX_AGE, HeaderValue::from_static("600"));
    h.insert(header::VARY, HeaderValue::from_static("Origin"));
    res
}

fn healthz(gw: Arc<Gateway>) -> Response {
    #[derive(Serialize)]
    #[serde(rename_all = "camelCase")]
    struct Plugin {
        name: String,
        events: Vec<String>,
    }
    #[derive(Serialize)]
    struct History {
        status: &'static str,
        #[serde(skip_serializing_if = "Option::is_none")]
        error: Option<String>,
        /// Rooms whose history state is in memory (see `history.unload_after`).
        rooms: usize,
    }
    #[derive(Serialize)]
    #[serde(rename_all = "camelCase")]
    struct Health {
        status: &'static str,
        connections: usize,
        rooms: usize,
        uptime_seconds: u64,
        plugins: Vec<Plugin>,
        history: History,
    }
    let plugins =
        gw.plugins.summary().into_iter().map(|(name, events)| Plugin { name: name.to_string(), events }).collect();
    let history = gw.history.health().borrow().clone();
    warp::reply::json(&Health {
        // Live traffic is served either way; "degraded" says persistence is not.
        status: if matches!(history, crate::history::Health::Ok | crate::history::Health::Disabled) {
            "ok"
        } else {
            "degraded"
        },
        history: History {
            status: history.label(),
            error: history.error().map(str::to_string),
            rooms: gw.history.streams_in_memory(),
        },
        connections: gw.hub.connection_count(),
        rooms: gw.hub.room_count(),
        uptime_seconds: gw.epoch.elapsed().as_secs(),
        plugins,
    })
    .into_response()
}

/// `GET /rooms/{room}/history?after=SEQ|before=SEQ&limit=N`: a page of persisted messages,
/// ascending, as `{"room":R,"messages":[…],"next":SEQ|null,"prev":SEQ|null}`.
async fn history(room: String, query: String, headers: HeaderMap, gw: Arc<Gateway>) -> Response {
    let bad = |message: &str| error_reply(StatusCode::BAD_REQUEST, "bad_request", message);
    let Ok(room) = RoomName::parse(&room) else {
        return bad("invalid room name");
    };
    // The same identity and permissions as a WebSocket connection.
    let profile = match gw.auth.mode() {
        AuthMode::Anonymous => Profile::guest(Arc::from("")),
        AuthMode::Jwt => {
            let verified = Auth::token_from(&headers, &query)
                .ok_or(AuthError::Missing)
                .and_then(|(token, _)| gw.auth.verify(&token, gw.settings.limits.max_name_chars));
            match verified {
                Ok((_, profile)) => profile,
                Err(e) => return error_reply(StatusCode::UNAUTHORIZED, "unauthorized", &e.to_string()),
            }
        }
    };
    if !gw.auth.may_enter(&profile, &room) {
        return error_reply(StatusCode::FORBIDDEN, "forbidden", "you may not read this room");
    }
    let settings = gw.history.settings();
    let (mut after, mut before, mut limit) = (None, None, None);
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let slot = match key {
            "after" => &mut after,
            "before" => &mut before,
            "limit" => &mut limit,
            "token" => continue,
            _ => return bad("unknown parameter: use after, before and limit"),
        };
        match value.parse::<u64>() {
            Ok(v) if slot.is_none() => *slot = Some(v),
            Ok(_) => return bad("a parameter is repeated"),
            Err(_) => return bad("after, before and limit must be non-negative integers"),
        }
    }
    let page = match (after, before) {
        (Some(_), Some(_)) => return bad("give after or before, not both"),
        (Some(a), None) => Page::After(a),
        (None, Some(b)) => Page::Before(b),
        (None, None) => Page::Latest,
    };
    let limit = match limit {
        None => settings.page_limit,
        Some(0) => return bad("limit must be at least 1"),
        Some(n) => n.min(u64::from(settings.page_limit_max)) as u32,
    };
    match gw.history.page(&room, page, limit).await {
        Ok(page) => {
            // The stored bodies are already JSON: splice them in rather than re-encode.
            let size: usize = page.messages.iter().map(|(_, b)| b.len() + 1).sum();
            let mut body = String::with_capacity(size + 96);
            body.push_str("{\"room\":");
            body.push_str(&serde_json::to_string(room.as_str()).unwrap_or_default());
            body.push_str(",\"messages\":[");
            for (i, (_, message)) in page.messages.iter().enumerate() {
                if i > 0 {
                    body.push(',');
                }
                body.push_str(message);
            }
            let num = |n: Option<u64>| n.map_or("null".to_string(), |n| n.to_string());
            body.push_str(&format!("],\"next\":{},\"prev\":{}}}", num(page.next), num(page.prev)));
            warp::http::Response::builder()
                .header(header::CONTENT_TYPE, "application/json")
                .body(body)
                .map(Reply::into_response)
                .unwrap_or_else(|_| error_reply(StatusCode::INTERNAL_SERVER_ERROR, "internal", "internal error"))
        }
        Err(HistoryError::Disabled) => error_reply(StatusCode::NOT_FOUND, "history_disabled", "history is disabled"),
        Err(e @ HistoryError::Unavailable(_)) => {
            error_reply(StatusCode::SERVICE_UNAVAILABLE, "history_unavailable", &e.to_string())
        }
    }
}
