//! The HTTP surface under hostile or merely unusual clients: connections that never finish
//! their headers or never upgrade, per-IP caps on every connection, hyper's own error
//! answers, `HEAD`, and who may read `/metrics`.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Sends `request` as is and reads the answer to the end (the server closes the
/// connection after it): (status, headers lowercased, body).
async fn raw(addr: SocketAddr, request: &[u8]) -> (u16, Vec<(String, String)>, String) {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(request).await.expect("write");
    let mut buf = Vec::new();
    tokio::time::timeout(TIMEOUT, s.read_to_end(&mut buf)).await.expect("answer in time").expect("read");
    let text = String::from_utf8_lossy(&buf).to_string();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let mut lines = head.lines();
    let status = lines.next().and_then(|l| l.split(' ').nth(1)).and_then(|c| c.parse().ok()).expect("a status");
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    (status, headers, body.to_string())
}

/// Whether the server closes `s` (end of stream or reset) within [`TIMEOUT`]; what it
/// sends before closing is ignored.
async fn closed_by_server(s: &mut TcpStream) -> bool {
    let mut buf = [0u8; 4096];
    let read_all = async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => continue,
            }
        }
    };
    tokio::time::timeout(TIMEOUT, read_all).await.is_ok()
}

fn assert_security_headers(what: &str, headers: &[(String, String)]) {
    for name in ["x-content-type-options", "x-frame-options", "content-security-policy", "referrer-policy"] {
        assert!(header(headers, name).is_some(), "{what}: no {name} in {headers:?}");
    }
}

/// A connection that never finishes its headers, never sends anything, or goes idle after
/// a response is closed after `server.header_timeout`.
#[tokio::test]
async fn connections_that_never_finish_a_request_are_closed() {
    let mut s = settings();
    s.server.header_timeout = Duration::from_millis(300);
    let gw = Gw::start(s).await;

    let mut slow = TcpStream::connect(gw.addr).await.unwrap();
    slow.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: 1\r\n").await.unwrap();
    let mut silent = TcpStream::connect(gw.addr).await.unwrap();
    let mut idle = TcpStream::connect(gw.addr).await.unwrap();
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let mut head = [0u8; 12];
    idle.read_exact(&mut head).await.unwrap();
    assert_eq!(&head, b"HTTP/1.1 200");

    assert!(closed_by_server(&mut slow).await, "a request head never finished keeps its connection");
    assert!(closed_by_server(&mut silent).await, "a connection that sends nothing is kept");
    assert!(closed_by_server(&mut idle).await, "an idle kept-alive connection is kept");
    // A request that does finish is served.
    let (status, _, _) = http_get(gw.addr, "/healthz", &[]).await;
    assert_eq!(status, 200);
}

/// Every TCP connection counts against the per-IP cap, not only WebSockets: sockets that
/// never send a request cannot be opened past it, and the one over it gets 429.
#[tokio::test]
async fn every_connection_counts_against_the_per_ip_cap() {
    let mut s = settings();
    s.limits.max_connections_per_ip = 3;
    let gw = Gw::start(s).await;
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(TcpStream::connect(gw.addr).await.unwrap());
    }
    let (status, headers, body) = raw(gw.addr, b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await;
    assert_eq!(status, 429, "{body}");
    let body: Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(body["error"], "too_many_connections");
    assert_security_headers("429", &headers);
    drop(held);
}

/// hyper answers some malformed requests itself, without the routes: those answers carry
/// the security headers too.
#[tokio::test]
async fn hypers_own_error_answers_carry_the_security_headers() {
    let gw = Gw::default().await;
    let huge_header = format!("GET / HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n", "a".repeat(500_000));
    let long_uri = format!("GET /{} HTTP/1.1\r\nHost: x\r\n\r\n", "a".repeat(70_000));
    for (what, request, want) in [
        ("a malformed request line", "GET\u{1} / HTTP/1.1\r\n\r\n".to_string(), 400),
        ("a header section too large", huge_header, 431),
        ("a URI too long", long_uri, 414),
    ] {
        let (status, headers, _) = raw(gw.addr, request.as_bytes()).await;
        assert_eq!(status, want, "{what}");
        assert_security_headers(what, &headers);
    }
}

/// `HEAD` is answered wherever `GET` is: the same status and headers, no body.
#[tokio::test]
async fn head_is_answered_wherever_get_is() {
    let gw = Gw::default().await;
    for path in ["/", "/healthz", "/rtgate.js", "/metrics", "/rooms/lobby/history"] {
        let (get_status, get_headers, get_body) = http_get(gw.addr, path, &[]).await;
        let request = format!("HEAD {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        let (status, headers, body) = raw(gw.addr, request.as_bytes()).await;
        assert_eq!((status, get_status), (200, 200), "HEAD {path}");
        assert_eq!(header(&headers, "content-type"), header(&get_headers, "content-type"), "HEAD {path}");
        assert_eq!(body, "", "HEAD {path} has no body");
        assert!(!get_body.is_empty());
        assert_security_headers(path, &headers);
    }
}

/// `/metrics` can be moved to a listener of its own, which the gateway's address then does
/// not serve, and can require a key.
#[tokio::test]
async fn metrics_can_have_their_own_address_and_a_key() {
    let mut s = settings();
    s.metrics.listen = rtgate::config::MetricsListen::Separate("127.0.0.1:0".parse().unwrap());
    let gw = Gw::start(s).await;
    let metrics = gw.running.as_ref().unwrap().metrics_addr.expect("a metrics address");
    assert_ne!(metrics, gw.addr);
    assert_eq!(http_get(gw.addr, "/metrics", &[]).await.0, 404);
    let (status, _, body) = http_get(metrics, "/metrics", &[]).await;
    assert_eq!(status, 200);
    assert!(body.contains("rtgate_connections "), "{body}");
    // Nothing else is served there.
    assert_eq!(http_get(metrics, "/healthz", &[]).await.0, 404);

    let mut s = settings();
    s.metrics.key = "metrics-key-for-tests".into();
    let gw = Gw::start(s).await;
    for auth in [None, Some("Bearer wrong"), Some("Bearer metrics-key-for-test"), Some("metrics-key-for-tests")] {
        let extra: Vec<(&str, &str)> = auth.map(|a| ("Authorization", a)).into_iter().collect();
        let (status, headers, body) = http_get(gw.addr, "/metrics", &extra).await;
        assert_eq!(status, 401, "{auth:?}: {body}");
        assert_eq!(serde_json::from_str::<Value>(&body).unwrap()["error"], "unauthorized");
        assert_security_headers("401", &headers);
    }
    let (status, _, body) = http_get(gw.addr, "/metrics", &[("Authorization", "Bearer metrics-key-for-tests")]).await;
    assert_eq!(status, 200);
    assert!(body.contains("rtgate_connections "), "{body}");
}
