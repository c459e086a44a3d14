//! The TCP side of HTTP: accepting connections, admitting each by its address, and serving
//! it as an HTTP/1 connection (with upgrades) until it closes, upgrades, or shutdown.
//!
//! Admission happens here, per TCP connection and before a byte is parsed, so the per-IP
//! caps count every connection (a page load, a health check, a socket that never finishes
//! its headers), not only WebSockets: an address at its cap gets a canned 429 and nothing
//! else. Every connection must send a complete request head within
//! `server.header_timeout` of connecting or of its previous response, so connections that
//! never finish their headers, or sit idle without upgrading, cannot hold descriptors.
//!
//! hyper answers some malformed requests itself (400, 414, 431) without calling the routes;
//! [`Headed`] adds the security headers every response is documented to carry to those.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc, watch};
use warp::{Filter, Reply};

use crate::metrics::Metrics;
use crate::ratelimit::{IpLimits, IpRefusal, IpSlot};

/// What the routes learn about the connection a request came on.
#[derive(Clone)]
pub struct Peer {
    pub addr: SocketAddr,
    /// The address's slot under the per-IP cap: an upgrade keeps it for the WebSocket's
    /// life.
    pub slot: Option<Arc<IpSlot>>,
}

/// How connections on one listener are admitted and served.
pub struct Policy {
    /// Per-IP caps; `None` on an internal listener (metrics).
    pub limits: Option<Arc<IpLimits>>,
    pub header_timeout: Duration,
    pub metrics: Arc<Metrics>,
}

/// Connections being refused at once; beyond this a refused connection is closed without
/// an answer (refusing must not itself become a way to hold descriptors).
const REFUSING: usize = 256;
/// How long a refused connection is given to send its request and read the 429.
const REFUSE_TIMEOUT: Duration = Duration::from_secs(2);

/// Accepts connections until `stop` resolves, then lets open HTTP requests finish.
///
/// Every socket gets `TCP_NODELAY`: a gateway writes many small frames, and Nagle's
/// algorithm meeting the client's delayed ACK would hold some of them back for up to 40 ms.
pub async fn serve<F>(listener: TcpListener, routes: F, policy: Policy, stop: impl Future<Output = ()>)
where
    F: Filter + Clone + Send + Sync + 'static,
    F::Extract: Reply,
{
    let (closing_tx, closing) = watch::channel(false);
    // Every connection task holds a sender; when all are gone, every connection is.
    let (alive_tx, mut alive) = mpsc::channel::<()>(1);
    let refusing = Arc::new(Semaphore::new(REFUSING));
    let mut stop = std::pin::pin!(stop);
    loop {
        let (stream, addr) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    // Out of file descriptors, typically: give connections time to close.
                    tracing::error!("accept: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = &mut stop => break,
        };
        let slot = match policy.limits.as_ref().map(|limits| limits.admit(addr.ip())) {
            Some(Ok(slot)) => Some(Arc::new(slot)),
            Some(Err(refusal)) => {
                policy.metrics.upgrades_refused.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tracing::debug!(peer = %addr, "connection refused: {refusal:?}");
                if let Ok(permit) = refusing.clone().try_acquire_owned() {
                    tokio::spawn(async move {
                        refuse(stream, refusal).await;
                        drop(permit);
                    });
                }
                continue;
            }
            None => None,
        };
        let _ = stream.set_nodelay(true);
        let peer = Peer { addr, slot };
        let service = warp::service(routes.clone());
        let service = hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
            req.extensions_mut().insert(peer.clone());
            tower_service::Service::call(&mut service.clone(), req)
        });
        let mut closing = closing.clone();
        let alive = alive_tx.clone();
        let header_timeout = policy.header_timeout;
        tokio::spawn(async move {
            let _alive = alive;
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(header_timeout)
                .serve_connection(TokioIo::new(Headed::new(stream)), service)
                .with_upgrades();
            let mut conn = std::pin::pin!(conn);
            let result = tokio::select! {
                result = conn.as_mut() => result,
                () = async { _ = closing.wait_for(|closing| *closing).await; } => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(e) = result {
                tracing::debug!("http connection: {e}");
            }
        });
    }
    drop(listener);
    let _ = closing_tx.send(true);
    drop(alive_tx);
    let _ = alive.recv().await;
}

/// Answers a connection refused by the per-IP caps with 429 and closes it. The request is
/// read first (a little of it, briefly): closing a socket with unread input makes the
/// kernel reset it, which can destroy the answer before the client reads it.
async fn refuse(mut stream: TcpStream, refusal: IpRefusal) {
    let why = match refusal {
        IpRefusal::TooManyOpen => "too many connections from this address",
        IpRefusal::TooFast => "connecting too fast from this address",
    };
    let body = format!(r#"{{"error":"too_many_connections","message":"{why}"}}"#);
    let mut head = format!(
        "HTTP/1.1 429 Too Many Requests\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n",
        body.len()
    );
    for (name, value) in crate::http::security_headers() {
        if let (Some(name), Ok(value)) = (name, value.to_str()) {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
    }
    let answer = async {
        let mut buf = [0u8; 1024];
        let mut seen = Vec::new();
        while !seen.windows(4).any(|w| w == b"\r\n\r\n") && seen.len() < 16 << 10 {
            let n = stream.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            seen.extend_from_slice(&buf[..n]);
        }
        stream.write_all(format!("{head}\r\n{body}").as_bytes()).await?;
        stream.shutdown().await
    };
    let _ = tokio::time::timeout(REFUSE_TIMEOUT, answer).await;
}

/// The connection's byte stream, passing everything through except response heads hyper
/// writes on its own (its answers to requests it could not parse), which lack the headers
/// of every routed response: those get them added.
struct Headed<S> {
    inner: S,
    /// A rewritten head not yet written, and how much of it is.
    pending: Vec<u8>,
    written: usize,
}

impl<S> Headed<S> {
    fn new(inner: S) -> Headed<S> {
        Headed { inner, pending: Vec::new(), written: 0 }
    }
}

/// `buf` with the security headers added, if it begins with an error response head that
/// has none (every routed response has `x-content-type-options`).
fn with_security_headers(buf: &[u8]) -> Option<Vec<u8>> {
    let status = buf.strip_prefix(b"HTTP/1.1 ")?;
    if !matches!(status.first(), Some(b'4' | b'5')) {
        return None;
    }
    let end = buf.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = &buf[..end];
    if head.windows(22).any(|w| w.eq_ignore_ascii_case(b"x-content-type-options")) {
        return None;
    }
    let mut out = Vec::with_capacity(buf.len() + 512);
    out.extend_from_slice(head);
    for (name, value) in crate::http::security_headers() {
        if let Some(name) = name {
            out.extend_from_slice(b"\r\n");
            out.extend_from_slice(name.as_str().as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(value.as_bytes());
        }
    }
    out.extend_from_slice(&buf[end..]);
    Some(out)
}

impl<S: AsyncWrite + Unpin> Headed<S> {
    fn poll_pending(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.written < self.pending.len() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.pending[self.written..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.written += n;
        }
        self.pending.clear();
        self.written = 0;
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Headed<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Headed<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        ready!(self.poll_pending(cx))?;
        if let Some(head) = with_security_headers(buf) {
            self.pending = head;
            // Taken whole; written out by the next write, flush or shutdown at the latest.
            let _ = self.poll_pending(cx)?;
            return Poll::Ready(Ok(buf.len()));
        }
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_pending(cx))?;
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_pending(cx))?;
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    // Not vectored: hyper then hands a response head to one `poll_write`, whole.
    fn is_write_vectored(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_unrouted_error_heads_get_headers() {
        let canned = b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\n\r\n";
        let fixed = String::from_utf8(with_security_headers(canned).unwrap()).unwrap();
        assert!(fixed.starts_with("HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\n"));
        assert!(fixed.contains("\r\nx-frame-options: DENY"), "{fixed}");
        assert!(fixed.ends_with("\r\n\r\n"));
        let routed = b"HTTP/1.1 404 Not Found\r\nx-content-type-options: nosniff\r\n\r\n{}";
        assert!(with_security_headers(routed).is_none());
        assert!(with_security_headers(b"HTTP/1.1 200 OK\r\n\r\n").is_none());
        assert!(with_security_headers(b"\x81\x05hello").is_none());
    }
}
