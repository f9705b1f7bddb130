//! The accept loop: TLS over a bound listener, a cap on concurrent HTTP
//! connections, a deadline for the handshake and headers, and a graceful stop
//! when the shutdown future resolves (the structure of tokio-rs/mini-redis).
//! A connection upgraded to a device channel leaves this cap for the
//! channel budget ([`crate::budget`]). HTTP/2 is served to clients that ask
//! for it by ALPN (agents: their parallel downloads share one connection);
//! everyone else, and the WebSocket channel, speaks HTTP/1.1. Each request
//! carries its connection's peer address as axum's [`ConnectInfo`] (the
//! device channel records it as the device's address).

use axum::extract::ConnectInfo;
use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt as _;

/// How long open connections get to finish once shutdown starts.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a closed connection keeps reading what its client still sends
/// (see [`Counted::poll_shutdown`]).
const LINGER: Duration = Duration::from_secs(2);
/// HTTP/2: parallel downloads of one agent share a connection. Streams per
/// connection are bounded (each request still takes its kind's budget).
const H2_MAX_STREAMS: u32 = 64;
const H2_PING_EVERY: Duration = Duration::from_secs(20);
/// The 24-byte connection preface and the 9-byte header of the SETTINGS
/// frame that must follow it (RFC 9113, 3.4).
const H2_OPENING: u64 = 24 + 9;
/// Receive windows for uploads (the CLI pushes chunks); downloads are
/// paced by the client's windows.
const H2_STREAM_WINDOW: u32 = 1 << 20;
const H2_CONNECTION_WINDOW: u32 = 4 << 20;
/// Bytes a download stream may queue in the server beyond what the socket
/// takes: enough to keep the link busy, little enough that pacing and the
/// sent-chunk counts stay close to what really left.
const H2_SEND_BUFFER: usize = 128 << 10;

#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub max_connections: usize,
    pub handshake_timeout: Duration,
}

pub async fn serve(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    app: Router,
    options: ServeOptions,
    shutdown: impl Future<Output = ()>,
) {
    let acceptor = TlsAcceptor::from(tls);
    let limit = Arc::new(Semaphore::new(options.max_connections));
    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::pin!(shutdown);
    loop {
        // Wait for a free slot before accepting, so excess clients queue in
        // the kernel's backlog instead of costing us memory.
        let permit = tokio::select! {
            permit = limit.clone().acquire_owned() => permit.expect("the semaphore is never closed"),
            () = &mut shutdown => break,
        };
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let app = app.clone();
        let handshake_timeout = options.handshake_timeout;
        let mut stop = stop_rx.clone();
        tokio::spawn(async move {
            // Held until the connection closes or is upgraded: hyper's
            // connection future ends when it hands the socket to a channel.
            let _permit = permit;
            let tls = match tokio::time::timeout(handshake_timeout, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    tracing::debug!(%peer, "TLS handshake failed: {e}");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%peer, "TLS handshake timed out");
                    return;
                }
            };
            let negotiated_h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
            let received = Arc::new(AtomicU64::new(0));
            let io = TokioIo::new(Counted {
                inner: tls,
                received: received.clone(),
                linger: None,
            });
            // What a client must send within the deadline before the
            // protocol's own timers take over: HTTP/1.1's header deadline
            // runs from its first byte, HTTP/2's pings from the end of its
            // opening (the connection preface and a SETTINGS frame header).
            let opening = if negotiated_h2 { H2_OPENING } else { 1 };
            let opened = Opened {
                received,
                opening,
                limit: handshake_timeout,
            };
            // The peer into every request of this connection: what
            // `Router::into_make_service_with_connect_info` does for
            // axum::serve, which this loop does not use.
            let app = app.map_request(
                move |mut request: axum::http::Request<hyper::body::Incoming>| {
                    request.extensions_mut().insert(ConnectInfo(peer));
                    request
                },
            );
            let service = TowerToHyperService::new(app);
            // The protocol is the one ALPN settled on, never guessed from the
            // client's first bytes (hyper-util's auto builder waits for them
            // with no deadline). No ALPN (the agent's WebSocket channel, old
            // clients) means HTTP/1.1.
            if negotiated_h2 {
                let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
                builder
                    .timer(TokioTimer::new())
                    // Pings find dead peers once the connection is open;
                    // one that never opens it is closed in `drive`.
                    .keep_alive_interval(H2_PING_EVERY)
                    .keep_alive_timeout(handshake_timeout)
                    .max_concurrent_streams(H2_MAX_STREAMS)
                    .initial_stream_window_size(H2_STREAM_WINDOW)
                    .initial_connection_window_size(H2_CONNECTION_WINDOW)
                    .max_send_buf_size(H2_SEND_BUFFER);
                let conn = builder.serve_connection(io, service);
                drive(conn, |c| c.graceful_shutdown(), &opened, &mut stop, peer).await;
            } else {
                // The header deadline runs from the first read.
                let mut builder = hyper::server::conn::http1::Builder::new();
                builder
                    .timer(TokioTimer::new())
                    .header_read_timeout(handshake_timeout)
                    .keep_alive(true);
                let conn = builder.serve_connection(io, service).with_upgrades();
                drive(conn, |c| c.graceful_shutdown(), &opened, &mut stop, peer).await;
            }
        });
    }
    tracing::info!("shutting down: draining connections");
    let _ = stop_tx.send(true);
    let all = u32::try_from(options.max_connections).unwrap_or(u32::MAX);
    let _ = tokio::time::timeout(DRAIN_TIMEOUT * 2, limit.acquire_many(all)).await;
}

/// The client's opening: at least `opening` bytes within `limit` of the
/// TLS handshake.
struct Opened {
    received: Arc<AtomicU64>,
    opening: u64,
    limit: Duration,
}

/// Runs one connection until it ends, or until shutdown starts (then lets
/// it finish what it is doing, for [`DRAIN_TIMEOUT`]). A client that has not
/// sent its opening in time is closed.
async fn drive<C, E>(
    conn: C,
    graceful_shutdown: impl Fn(Pin<&mut C>),
    opened: &Opened,
    stop: &mut watch::Receiver<bool>,
    peer: SocketAddr,
) where
    C: Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    tokio::pin!(conn);
    let silent = async {
        tokio::time::sleep(opened.limit).await;
        if opened.received.load(Ordering::Relaxed) >= opened.opening {
            std::future::pending::<()>().await;
        }
    };
    tokio::select! {
        result = conn.as_mut() => {
            if let Err(e) = result {
                tracing::debug!(%peer, "connection ended with error: {e}");
            }
        }
        () = silent => tracing::debug!(%peer, "client did not open its connection in time after the TLS handshake; closed"),
        _ = stop.changed() => {
            graceful_shutdown(conn.as_mut());
            let _ = tokio::time::timeout(DRAIN_TIMEOUT, conn).await;
        }
    }
}

/// A connection's stream that counts the bytes the client sent and closes
/// lingering.
struct Counted<S> {
    inner: S,
    received: Arc<AtomicU64>,
    /// Set once our side is closed: when to stop waiting for the client's.
    linger: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        let read = (buf.filled().len() - before) as u64;
        if read > 0 {
            self.received.fetch_add(read, Ordering::Relaxed);
        }
        polled
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for Counted<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    /// Closes our side, then reads and discards what the client still sends
    /// until it closes too or [`LINGER`] passes. The server may answer
    /// before it reads a body it refuses (a 403 on the headers alone);
    /// closing at once with the rest of that body still arriving makes the
    /// kernel reset the connection, and a client still writing its body
    /// then loses the answer (Apache's and nginx's lingering close).
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        let deadline = match &mut this.linger {
            Some(deadline) => deadline,
            None => {
                std::task::ready!(Pin::new(&mut this.inner).poll_shutdown(cx))?;
                this.linger.insert(Box::pin(tokio::time::sleep(LINGER)))
            }
        };
        let mut discard = [0u8; 4096];
        loop {
            if deadline.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Ok(()));
            }
            let mut buf = ReadBuf::new(&mut discard);
            match Pin::new(&mut this.inner).poll_read(cx, &mut buf) {
                Poll::Ready(Ok(())) if !buf.filled().is_empty() => continue,
                // The client closed, or the connection broke: nothing to wait for.
                Poll::Ready(_) => return Poll::Ready(Ok(())),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}
