//! The accept loop: HTTP/1.1 connections served by hyper around axum's router, with the limits
//! that keep one slow or idle client from taking the server down.
//!
//! - A connection with no request in progress (none sent yet, a header arriving slowly, or
//!   kept alive after its last response) is closed after [`NetConfig::idle_timeout`]. One timer
//!   covers all three: a request counts as in progress from its parsed header until its
//!   response body is done.
//! - At most [`NetConfig::max_connections`] are open, below the descriptor limit so `accept`
//!   never fails for want of one. At the cap, a new connection closes the one idle longest, so
//!   a flood of idle sockets cannot lock out `/health` or a chat request; only when every
//!   connection has a request in progress is the new one turned away.
//! - On shutdown the loop stops accepting, idle connections close, and responses in progress
//!   finish.

use axum::body::Body;
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio::sync::{watch, Notify};
use tower::ServiceExt;

/// Connection limits (the `whet serve` flags).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NetConfig {
    /// A connection with no request in progress for this long is closed.
    pub idle_timeout: Duration,
    /// A request body must arrive within this long of its header.
    pub body_timeout: Duration,
    /// Reading an adapter's files for `POST /v1/adapters` must finish within this long.
    pub adapter_load_timeout: Duration,
    /// Most open connections; `None`: the descriptor limit less [`RESERVED_FDS`].
    pub max_connections: Option<usize>,
}

impl Default for NetConfig {
    fn default() -> Self {
        Self {
            idle_timeout: Duration::from_secs(30),
            body_timeout: Duration::from_secs(30),
            adapter_load_timeout: Duration::from_secs(60),
            max_connections: None,
        }
    }
}

/// Descriptors kept back from connections: the model's and adapters' files, the runtime's own.
pub const RESERVED_FDS: usize = 256;

/// The connection cap `max_connections: None` stands for. On Unix the soft descriptor limit is
/// first raised to the hard one (as Go's runtime and most servers do), since a default soft
/// limit of 1024 is far below what one machine can hold.
pub(crate) fn default_max_connections() -> usize {
    fds().saturating_sub(RESERVED_FDS).max(16)
}

#[cfg(unix)]
fn fds() -> usize {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else { return 1024 };
    // macOS refuses a soft limit above OPEN_MAX even when the hard limit is unlimited.
    let want = hard.min(1 << 16);
    if want > soft && setrlimit(Resource::RLIMIT_NOFILE, want, hard).is_ok() {
        return want as usize;
    }
    soft as usize
}

#[cfg(not(unix))]
fn fds() -> usize {
    1024
}

/// One open connection, as the accept loop sees it.
struct Conn {
    /// Requests whose header is parsed and whose response body is not done.
    active: AtomicUsize,
    /// When `active` last fell to zero (or the connection opened).
    idle_since: Mutex<Instant>,
    /// Close now if idle (the cap is reached and this one has been idle longest).
    evict: Notify,
}

impl Conn {
    fn idle_for(&self) -> Option<Duration> {
        (self.active.load(Ordering::SeqCst) == 0).then(|| lock(&self.idle_since).elapsed())
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Marks a request in progress on its connection until dropped (with its response body).
struct InProgress(Arc<Conn>);

impl InProgress {
    fn new(conn: &Arc<Conn>) -> Self {
        conn.active.fetch_add(1, Ordering::SeqCst);
        Self(conn.clone())
    }
}

impl Drop for InProgress {
    fn drop(&mut self) {
        *lock(&self.0.idle_since) = Instant::now();
        self.0.active.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A response body that keeps its request in progress until it is done or dropped.
struct Tracked {
    inner: Body,
    _request: InProgress,
}

impl http_body::Body for Tracked {
    type Data = axum::body::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

type Registry = Arc<Mutex<HashMap<u64, Arc<Conn>>>>;

/// Serve `app` on `listener` until `shutdown` resolves, then let responses in progress finish.
pub(crate) async fn serve(
    listener: TcpListener,
    app: Router,
    cfg: NetConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let max = cfg.max_connections.unwrap_or_else(default_max_connections).max(1);
    let registry: Registry = Arc::default();
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut tasks = tokio::task::JoinSet::new();
    let mut next_id = 0u64;
    tokio::pin!(shutdown);
    loop {
        let (stream, _) = tokio::select! {
            () = &mut shutdown => break,
            Some(_) = tasks.join_next(), if !tasks.is_empty() => continue,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                // A connection reset before it was taken, or a momentary lack of descriptors
                // held by something else: keep serving the others.
                Err(e) => {
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
        };
        if !make_room(&registry, max) {
            tracing::warn!("{max} connections open, each with a request in progress: one refused");
            drop(stream);
            continue;
        }
        next_id += 1;
        let conn = Arc::new(Conn {
            active: AtomicUsize::new(0),
            idle_since: Mutex::new(Instant::now()),
            evict: Notify::new(),
        });
        lock(&registry).insert(next_id, conn.clone());
        let (app, registry, stop) = (app.clone(), registry.clone(), stop_rx.clone());
        let id = next_id;
        tasks.spawn(async move {
            connection(stream, app, &conn, cfg.idle_timeout, stop).await;
            lock(&registry).remove(&id);
        });
    }
    drop(listener);
    let _ = stop_tx.send(true);
    while tasks.join_next().await.is_some() {}
    Ok(())
}

/// Below the cap, or made so by closing the connection idle longest; `false` when every open
/// connection has a request in progress.
fn make_room(registry: &Registry, max: usize) -> bool {
    let conns = lock(registry);
    if conns.len() < max {
        return true;
    }
    let oldest = conns
        .values()
        .filter_map(|c| c.idle_for().map(|idle| (idle, c)))
        .max_by_key(|(idle, _)| *idle);
    match oldest {
        Some((_, c)) => {
            c.evict.notify_one();
            true
        }
        None => false,
    }
}

async fn connection(
    stream: tokio::net::TcpStream,
    app: Router,
    conn: &Arc<Conn>,
    idle_timeout: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let tracked = conn.clone();
    let service = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
        let request = InProgress::new(&tracked);
        let app = app.clone();
        async move {
            let response = app.oneshot(req.map(Body::new)).await?;
            Ok::<_, std::convert::Infallible>(
                response.map(|inner| Tracked { inner, _request: request }),
            )
        }
    });
    let http =
        hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service);
    tokio::pin!(http);
    let tick = (idle_timeout / 4).clamp(Duration::from_millis(10), Duration::from_secs(1));
    let mut ticks = tokio::time::interval(tick);
    let mut stopping = false;
    loop {
        tokio::select! {
            _ = &mut http => return,
            () = conn.evict.notified() => {
                if conn.idle_for().is_some() {
                    return; // dropping the connection closes its socket
                }
            }
            _ = stop.changed(), if !stopping => {
                stopping = true;
                http.as_mut().graceful_shutdown();
            }
            _ = ticks.tick() => {
                if conn.idle_for().is_some_and(|idle| idle >= idle_timeout || stopping) {
                    return;
                }
            }
        }
    }
}
