//! Raw socket ingest: TCP and Unix stream sockets (lines or length-prefixed frames) and
//! UDP (one datagram per message).
//!
//! Stream connections pipeline up to `PIPELINE` messages into the store and acknowledge
//! them in order (one 0x06 byte each when `ack` is on). When the store refuses for lack
//! of space (reject-new), the refused message is retried when space frees, and the
//! connection stops reading once its pipeline is full: back-pressure reaches the sender
//! through TCP instead of the agent buffering without bound.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use futures::stream::{FuturesOrdered, FuturesUnordered};
use futures::{FutureExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, UdpSocket, UnixListener};
use tokio::sync::Semaphore;
use tokio_util::codec::FramedRead;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::framing::{FrameDecoder, FrameError};
use super::{append_waiting_for_space, IngestError, IngestStats};
use crate::config::{Framing, Listen, SocketConfig};
use crate::record::{Origin, OriginKind, Record};
use crate::store::{AppendError, Store, StreamId};

/// Messages of one connection submitted but not yet acknowledged.
const PIPELINE: usize = 64;
/// Appends from one UDP socket awaiting commit.
const UDP_PIPELINE: usize = 1024;
/// The byte written back per committed message when `ack = true`.
pub const ACK_BYTE: u8 = 0x06;

/// Everything a socket's tasks share.
#[derive(Debug)]
struct Ctx {
    cfg: SocketConfig,
    store: Store,
    stream: StreamId,
    origin: Origin,
    stats: Arc<IngestStats>,
}

impl Ctx {
    fn record(&self, payload: Bytes) -> Record {
        Record::new(self.cfg.topic.clone(), payload, self.origin.clone())
    }
}

enum Bound {
    Tcp(TcpListener),
    Udp(UdpSocket),
    Unix(UnixListener, PathBuf),
}

/// A bound socket, ready to serve.
pub struct SocketIngest {
    bound: Bound,
    ctx: Arc<Ctx>,
}

impl std::fmt::Debug for SocketIngest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SocketIngest")
            .field("listen", &self.ctx.cfg.listen)
            .finish()
    }
}

impl SocketIngest {
    /// Bind the socket now, so a bad address fails start-up with a clear error.
    pub async fn bind(
        cfg: SocketConfig,
        store: Store,
        stream: StreamId,
    ) -> Result<Self, IngestError> {
        let listen = cfg.listen.to_string();
        let bind_err = |source| IngestError::Bind {
            listen: listen.clone(),
            source,
        };
        let bound = match &cfg.listen {
            Listen::Tcp(addr) => Bound::Tcp(TcpListener::bind(addr).await.map_err(bind_err)?),
            Listen::Udp(addr) => Bound::Udp(UdpSocket::bind(addr).await.map_err(bind_err)?),
            Listen::Unix(path) => Bound::Unix(bind_unix(path, &listen)?, path.clone()),
        };
        let origin = Origin {
            kind: OriginKind::Socket,
            name: Arc::from(listen.as_str()),
        };
        Ok(Self {
            bound,
            ctx: Arc::new(Ctx {
                cfg,
                store,
                stream,
                origin,
                stats: Arc::new(IngestStats::default()),
            }),
        })
    }

    /// Serve until cancelled; connection tasks are tracked by `tracker`.
    pub async fn run(self, tracker: TaskTracker, cancel: CancellationToken) {
        let ctx = self.ctx;
        let limit = Arc::new(Semaphore::new(ctx.cfg.max_connections.get()));
        match self.bound {
            Bound::Tcp(l) => loop {
                tokio::select! {
                    _ = cancel.cancelled() => break,
                    res = l.accept() => match res {
                        Ok((io, peer)) => {
                            let _ = io.set_nodelay(true);
                            admit(&ctx, &limit, &tracker, &cancel, io, peer.to_string());
                        }
                        Err(e) => accept_error(&ctx, e).await,
                    },
                }
            },
            Bound::Unix(l, path) => {
                loop {
                    tokio::select! {
                        _ = cancel.cancelled() => break,
                        res = l.accept() => match res {
                            Ok((io, _)) => admit(&ctx, &limit, &tracker, &cancel, io, "unix peer".into()),
                            Err(e) => accept_error(&ctx, e).await,
                        },
                    }
                }
                let _ = std::fs::remove_file(&path);
            }
            Bound::Udp(sock) => serve_udp(&ctx, sock, &cancel).await,
        }
        tracing::info!(
            listen = %ctx.cfg.listen,
            accepted = IngestStats::get(&ctx.stats.accepted),
            oversize = IngestStats::get(&ctx.stats.oversize),
            rejected = IngestStats::get(&ctx.stats.rejected),
            "socket ingest stopped"
        );
    }
}

/// Accept errors are usually transient (EMFILE, ECONNABORTED): log and pause briefly so
/// a persistent one does not spin the CPU.
async fn accept_error(ctx: &Ctx, e: std::io::Error) {
    tracing::warn!(listen = %ctx.cfg.listen, error = %e, "accept failed");
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
}

fn admit<S>(
    ctx: &Arc<Ctx>,
    limit: &Arc<Semaphore>,
    tracker: &TaskTracker,
    cancel: &CancellationToken,
    io: S,
    peer: String,
) where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let Ok(permit) = limit.clone().try_acquire_owned() else {
        IngestStats::inc(&ctx.stats.refused_connections);
        tracing::warn!(listen = %ctx.cfg.listen, %peer, max = ctx.cfg.max_connections.get(), "connection refused: max_connections reached");
        return;
    };
    IngestStats::inc(&ctx.stats.connections);
    let ctx = ctx.clone();
    let cancel = cancel.clone();
    tracker.spawn(async move {
        serve_stream(&ctx, io, &peer, &cancel).await;
        drop(permit);
    });
}

fn bind_unix(path: &Path, listen: &str) -> Result<UnixListener, IngestError> {
    use std::os::unix::fs::FileTypeExt;
    let err = |reason: String| IngestError::UnixPath {
        listen: listen.to_owned(),
        reason,
    };
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(err(
                "the path exists and is not a socket; refusing to replace it".into(),
            ));
        }
        // A live socket means another process serves it; a dead one is left over from a
        // crash and is safe to replace.
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(err("another process is listening on it".into()));
        }
        std::fs::remove_file(path).map_err(|e| err(format!("cannot remove stale socket: {e}")))?;
    }
    if let Some(dir) = path.parent() {
        if !dir.as_os_str().is_empty() {
            std::fs::create_dir_all(dir)
                .map_err(|e| err(format!("cannot create {}: {e}", dir.display())))?;
        }
    }
    UnixListener::bind(path).map_err(|source| IngestError::Bind {
        listen: listen.to_owned(),
        source,
    })
}

async fn serve_stream<S>(ctx: &Arc<Ctx>, io: S, peer: &str, cancel: &CancellationToken)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (rd, mut wr) = tokio::io::split(io);
    let mut frames = FramedRead::new(
        rd,
        FrameDecoder::new(ctx.cfg.framing, ctx.cfg.max_message_size.get()),
    );
    let mut pending = FuturesOrdered::new();
    let mut reading = true;
    let mut acks: Vec<u8> = Vec::new();
    let mut close_reason: Option<String> = None;
    loop {
        if !reading && pending.is_empty() {
            break;
        }
        tokio::select! {
            biased;
            // Stop reading on shutdown but still acknowledge what is being committed.
            _ = cancel.cancelled(), if reading => reading = false,
            Some(first) = pending.next(), if !pending.is_empty() => {
                let mut results = vec![first];
                while let Some(Some(r)) = pending.next().now_or_never() {
                    results.push(r);
                }
                acks.clear();
                for r in results {
                    match r {
                        Ok(_) => {
                            IngestStats::inc(&ctx.stats.accepted);
                            acks.push(ACK_BYTE);
                        }
                        Err(AppendError::TooLarge { cost, budget }) => {
                            IngestStats::inc(&ctx.stats.rejected);
                            tracing::warn!(%peer, cost, budget, "message dropped: larger than the whole buffer");
                        }
                        Err(AppendError::Closed) if cancel.is_cancelled() => {
                            // Shutting down while this message waited for space: it was
                            // never acknowledged, so the sender still owns it.
                            close_reason.get_or_insert_with(|| "agent shutting down".into());
                        }
                        Err(e) => {
                            // Not committed and cannot be retried here: stop acknowledging,
                            // so the sender knows everything from here on is unconfirmed.
                            IngestStats::inc(&ctx.stats.rejected);
                            close_reason.get_or_insert_with(|| format!("store refused a message: {e}"));
                            reading = false;
                        }
                    }
                }
                if close_reason.is_some() {
                    break;
                }
                if ctx.cfg.ack && !acks.is_empty() && wr.write_all(&acks).await.is_err() {
                    close_reason = Some("peer stopped reading acknowledgements".into());
                    break;
                }
            }
            frame = frames.next(), if reading && pending.len() < PIPELINE => match frame {
                Some(Ok(payload)) => {
                    if payload.is_empty() && ctx.cfg.framing == Framing::Lines {
                        continue;
                    }
                    let (store, stream, record, cancel) = (ctx.store.clone(), ctx.stream, ctx.record(payload), cancel.clone());
                    let what = ctx.origin.name.clone();
                    pending.push_back(async move { append_waiting_for_space(&store, stream, record, &cancel, &what).await });
                }
                Some(Err(FrameError::Oversize { max })) => {
                    IngestStats::inc(&ctx.stats.oversize);
                    close_reason = Some(format!("message larger than max_message_size ({max} bytes)"));
                    reading = false;
                }
                Some(Err(FrameError::Io(e))) => {
                    close_reason = Some(format!("read error: {e}"));
                    reading = false;
                }
                None => reading = false,
            },
        }
    }
    let _ = wr.shutdown().await;
    match close_reason {
        Some(reason) => {
            tracing::warn!(listen = %ctx.cfg.listen, %peer, %reason, "closed connection")
        }
        None => tracing::debug!(listen = %ctx.cfg.listen, %peer, "connection ended"),
    }
}

async fn serve_udp(ctx: &Arc<Ctx>, sock: UdpSocket, cancel: &CancellationToken) {
    let max = ctx.cfg.max_message_size.get();
    // One byte more than allowed, so an oversize datagram is detected rather than
    // silently truncated.
    let mut buf = vec![0u8; max + 1];
    let mut pending = FuturesUnordered::new();
    loop {
        tokio::select! {
            biased;
            _ = cancel.cancelled() => break,
            Some(r) = pending.next(), if !pending.is_empty() => count_udp(ctx, r),
            res = sock.recv_from(&mut buf), if pending.len() < UDP_PIPELINE => match res {
                Ok((n, peer)) if n > max => {
                    IngestStats::inc(&ctx.stats.oversize);
                    tracing::warn!(listen = %ctx.cfg.listen, %peer, max, "datagram dropped: larger than max_message_size");
                }
                Ok((n, _)) => {
                    let record = ctx.record(Bytes::copy_from_slice(&buf[..n]));
                    match ctx.store.submit(ctx.stream, record).await {
                        Ok(p) => pending.push(p),
                        Err(e) => count_udp(ctx, Err(e)),
                    }
                }
                Err(e) => {
                    tracing::warn!(listen = %ctx.cfg.listen, error = %e, "UDP receive failed");
                }
            },
        }
    }
    while let Some(r) = pending.next().await {
        count_udp(ctx, r);
    }
}

fn count_udp(ctx: &Ctx, r: Result<u64, AppendError>) {
    match r {
        Ok(_) => IngestStats::inc(&ctx.stats.accepted),
        Err(e) => {
            IngestStats::inc(&ctx.stats.rejected);
            tracing::warn!(listen = %ctx.cfg.listen, error = %e, "datagram dropped: store refused it");
        }
    }
}
