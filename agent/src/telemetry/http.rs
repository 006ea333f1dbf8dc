//! The operator's HTTP endpoint (`[metrics] listen`, loopback by default): `/metrics`
//! (Prometheus text), `/health` (the process answers), `/ready` (200, or 503 and why),
//! `/status` (the `Status` JSON `edgerelay status` renders), and the dead-letter
//! routes of `Admin`.
//!
//! Invariants: a request only reads snapshots (never waits on the store or uplink,
//! but for the admin routes, which are the operator's own commands); at most
//! `MAX_CONNECTIONS` at once, each with a header deadline, so a stuck scraper cannot
//! hold the agent's memory.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio_util::sync::CancellationToken;

use super::{metrics, Status};

/// Connections served at once; more wait in the kernel's backlog.
const MAX_CONNECTIONS: usize = 16;
/// Time a client has to send its request headers.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest request body accepted (the admin routes take small JSON).
const MAX_BODY: usize = 64 << 10;

/// An admin route's answer: None when the route is not the handler's, else (status,
/// JSON body).
pub type AdminAnswer<'a> = Pin<Box<dyn Future<Output = Option<(StatusCode, String)>> + Send + 'a>>;

/// Operator commands the endpoint serves besides the read-only routes: a route, its
/// method, the request body → (status, JSON body).
pub trait Admin: Send + Sync + 'static {
    fn handle(&self, method: Method, path: String, body: Bytes) -> AdminAnswer<'_>;
}

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("[metrics] listen {addr}: {source}")]
    Bind {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

pub struct Endpoint {
    listener: TcpListener,
    status: watch::Receiver<Status>,
    admin: Option<Arc<dyn Admin>>,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint")
            .field("listener", &self.listener)
            .finish_non_exhaustive()
    }
}

impl Endpoint {
    pub async fn bind(
        addr: std::net::SocketAddr,
        status: watch::Receiver<Status>,
        admin: Option<Arc<dyn Admin>>,
    ) -> Result<Self, HttpError> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| HttpError::Bind { addr, source })?;
        Ok(Self {
            listener,
            status,
            admin,
        })
    }

    pub fn local_addr(&self) -> Option<std::net::SocketAddr> {
        self.listener.local_addr().ok()
    }

    pub async fn run(self, cancel: CancellationToken) {
        let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        let tracker = tokio_util::task::TaskTracker::new();
        loop {
            let permit = tokio::select! {
                _ = cancel.cancelled() => break,
                p = slots.clone().acquire_owned() => match p {
                    Ok(p) => p,
                    Err(_) => break,
                },
            };
            let stream = tokio::select! {
                _ = cancel.cancelled() => break,
                accepted = self.listener.accept() => match accepted {
                    Ok((s, _)) => s,
                    Err(e) => {
                        tracing::debug!(error = %e, "metrics endpoint: accept failed");
                        continue;
                    }
                },
            };
            let (status, admin, cancel) = (self.status.clone(), self.admin.clone(), cancel.clone());
            tracker.spawn(async move {
                let _permit = permit;
                let service = hyper::service::service_fn(move |req| {
                    let (status, admin) = (status.clone(), admin.clone());
                    async move { Ok::<_, std::convert::Infallible>(route(req, &status, admin.as_deref()).await) }
                });
                let conn = hyper::server::conn::http1::Builder::new()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(HEADER_TIMEOUT)
                    .keep_alive(false)
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
                tokio::select! {
                    _ = cancel.cancelled() => {}
                    r = conn => if let Err(e) = r {
                        tracing::debug!(error = %e, "metrics endpoint: connection ended with an error");
                    },
                }
            });
        }
        tracker.close();
        tracker.wait().await;
    }
}

fn reply(code: StatusCode, content_type: &str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = code;
    if let Ok(v) = content_type.parse() {
        r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    r
}

async fn route(
    req: Request<Incoming>,
    status: &watch::Receiver<Status>,
    admin: Option<&dyn Admin>,
) -> Response<Full<Bytes>> {
    const TEXT: &str = "text/plain; charset=utf-8";
    const JSON: &str = "application/json";
    let (method, path) = (req.method().clone(), req.uri().path().to_owned());
    match (&method, path.as_str()) {
        (&Method::GET, "/metrics") => reply(
            StatusCode::OK,
            super::metrics::CONTENT_TYPE,
            metrics().encode(),
        ),
        (&Method::GET, "/health") => reply(StatusCode::OK, TEXT, "ok\n".into()),
        (&Method::GET, "/ready") => {
            let s = status.borrow();
            if s.ready {
                reply(StatusCode::OK, TEXT, "ready\n".into())
            } else {
                let why = s.not_ready.clone().unwrap_or_else(|| "starting".into());
                reply(
                    StatusCode::SERVICE_UNAVAILABLE,
                    TEXT,
                    format!("not ready: {why}\n"),
                )
            }
        }
        (&Method::GET, "/status") => {
            let body = serde_json::to_string(&*status.borrow()).unwrap_or_default();
            reply(StatusCode::OK, JSON, body)
        }
        _ => {
            let Some(admin) = admin else {
                return reply(StatusCode::NOT_FOUND, TEXT, "not found\n".into());
            };
            let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
                Ok(b) => b.to_bytes(),
                Err(e) => {
                    return reply(
                        StatusCode::BAD_REQUEST,
                        TEXT,
                        format!("request body: {e}\n"),
                    )
                }
            };
            match admin.handle(method, path, body).await {
                Some((code, body)) => reply(code, JSON, body),
                None => reply(StatusCode::NOT_FOUND, TEXT, "not found\n".into()),
            }
        }
    }
}

/// GET `path` from the endpoint at `addr` (for `edgerelay status` and
/// `dead-letters`): the status code and body. A plain HTTP/1.0 exchange with our own
/// server, which closes the connection after each answer.
pub async fn request(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    body: &str,
) -> std::io::Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::time::timeout(Duration::from_secs(5), tokio::net::TcpStream::connect(addr))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))??;
    let req = format!(
        "{method} {path} HTTP/1.0\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await?;
    let mut out = Vec::new();
    tokio::time::timeout(
        Duration::from_secs(30),
        s.take(64 << 20).read_to_end(&mut out),
    )
    .await
    .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no answer"))??;
    let text = String::from_utf8_lossy(&out);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::InvalidData, "not an HTTP answer")
        })?;
    Ok((code, body.to_owned()))
}
