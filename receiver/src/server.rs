//! The accept loop: hyper connections with our own connection timers, bounded buffers, and a
//! graceful drain on shutdown (stop accepting, let in-flight requests finish, within a time bound).
//!
//! hyper's `header_read_timeout` starts as soon as a keep-alive connection waits for its next
//! request, so it would close idle connections after a few seconds while load balancers reuse them
//! for 60 s or more (their next request then races the close: 502s, Smartcar retries). So hyper's
//! timer is off and each connection has a [`ConnClock`] instead:
//! - idle (no request started, none being answered): closed after `idle_timeout_ms`;
//! - a request head started (bytes arrived while idle): closed unless the head is complete within
//!   `header_timeout_ms` of its first byte;
//! - a request being handled: bounded by the request deadline in [`crate::webhook`].
//!
//! HTTP/2 connections (prior knowledge) get the idle timer only: their frames (pings, settings)
//! arrive between requests and are not request heads.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::webhook::App;

/// Largest request head (line + headers) accepted; hyper answers 431 beyond it.
const MAX_HEAD_BYTES: usize = 16 * 1024;

/// The HTTP/2 connection preface starts with this.
const H2_PREFACE_START: &[u8] = b"PRI * HTTP/2.0";

/// What one connection is doing, as the watchdog sees it.
struct ConnClock {
    /// Requests handed to the service and not yet answered.
    active: AtomicUsize,
    /// Since when nothing has been active (meaningful while `active` is 0).
    idle_since: Mutex<Instant>,
    /// When the first byte of a request head arrived while idle.
    head_since: Mutex<Option<Instant>>,
    /// Whether any byte was read yet (the first read decides `http2`).
    started: AtomicBool,
    http2: AtomicBool,
}

impl ConnClock {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            active: AtomicUsize::new(0),
            idle_since: Mutex::new(Instant::now()),
            head_since: Mutex::new(None),
            started: AtomicBool::new(false),
            http2: AtomicBool::new(false),
        })
    }

    fn set<T>(m: &Mutex<T>, v: T) {
        match m.lock() {
            Ok(mut g) => *g = v,
            Err(p) => *p.into_inner() = v,
        }
    }

    fn get<T: Copy>(m: &Mutex<T>) -> T {
        match m.lock() {
            Ok(g) => *g,
            Err(p) => *p.into_inner(),
        }
    }

    /// Bytes arrived.
    fn on_read(&self, first_bytes: &[u8]) {
        if !self.started.swap(true, Ordering::AcqRel) {
            let n = first_bytes.len().min(H2_PREFACE_START.len());
            self.http2.store(
                n > 0 && first_bytes[..n] == H2_PREFACE_START[..n],
                Ordering::Release,
            );
        }
        if self.active.load(Ordering::Acquire) == 0
            && !self.http2.load(Ordering::Acquire)
            && Self::get(&self.head_since).is_none()
        {
            Self::set(&self.head_since, Some(Instant::now()));
        }
    }

    /// A request's head is in: it is bounded by the request deadline from here.
    fn request_started(self: &Arc<Self>) -> RequestMark {
        self.active.fetch_add(1, Ordering::AcqRel);
        Self::set(&self.head_since, None);
        RequestMark(Arc::clone(self))
    }

    /// When the connection must be closed, given its state now.
    fn close_at(&self, header: Duration, idle: Duration) -> Option<Instant> {
        if self.active.load(Ordering::Acquire) > 0 {
            return None;
        }
        Some(match Self::get(&self.head_since) {
            Some(since) => since + header,
            None => Self::get(&self.idle_since) + idle,
        })
    }
}

/// Marks a request as being handled for as long as it lives.
struct RequestMark(Arc<ConnClock>);

impl Drop for RequestMark {
    fn drop(&mut self) {
        if self.0.active.fetch_sub(1, Ordering::AcqRel) == 1 {
            ConnClock::set(&self.0.idle_since, Instant::now());
            ConnClock::set(&self.0.head_since, None);
        }
    }
}

/// The TCP stream, telling the clock when bytes arrive.
struct Clocked {
    inner: TcpStream,
    clock: Arc<ConnClock>,
}

impl AsyncRead for Clocked {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let res = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(res, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.clock.on_read(&buf.filled()[before..]);
        }
        res
    }
}

impl AsyncWrite for Clocked {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
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
}

/// Resolves when the connection's clock says it must close.
async fn watchdog(clock: Arc<ConnClock>, header: Duration, idle: Duration) {
    // Re-checked at least this often: a request ending or a head starting moves the deadline.
    let tick = header.min(idle).min(Duration::from_millis(250));
    loop {
        match clock.close_at(header, idle) {
            Some(at) if Instant::now() >= at => return,
            Some(at) => tokio::time::sleep_until(at.min(Instant::now() + tick).into()).await,
            None => tokio::time::sleep(tick).await,
        }
    }
}

/// The hyper connection builder the webhook listener uses (also the benchmark's baseline server, so
/// both are measured with the same HTTP settings).
pub fn http_builder() -> Builder<TokioExecutor> {
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        // Off: it would also run on idle keep-alive connections (see the module doc).
        .header_read_timeout(None)
        .max_buf_size(MAX_HEAD_BYTES.max(8192));
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(64);
    builder
}

/// Serves until `shutdown`, then drains for at most `grace`. Returns whether the drain completed.
pub async fn serve(
    listener: TcpListener,
    app: Arc<App>,
    shutdown: CancellationToken,
    grace: Duration,
) -> bool {
    let builder = http_builder();
    let header = Duration::from_millis(app.settings.header_timeout_ms);
    let idle = Duration::from_millis(app.settings.idle_timeout_ms);
    let graceful = GracefulShutdown::new();
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break,
            a = listener.accept() => a,
        };
        let (stream, _peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // EMFILE and friends: back off briefly instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let clock = ConnClock::new();
        let svc = {
            let (app, clock) = (Arc::clone(&app), Arc::clone(&clock));
            service_fn(move |req| {
                let app = Arc::clone(&app);
                let mark = clock.request_started();
                async move {
                    let resp = app.handle(req).await;
                    drop(mark);
                    Ok::<_, std::convert::Infallible>(resp)
                }
            })
        };
        let io = Clocked {
            inner: stream,
            clock: Arc::clone(&clock),
        };
        let conn = builder.serve_connection(TokioIo::new(io), svc).into_owned();
        let watched = graceful.watch(conn);
        tokio::spawn(async move {
            tokio::select! {
                _ = watched => {}
                // Dropping the connection closes it: nothing is in flight when the clock fires.
                _ = watchdog(clock, header, idle) => {}
            }
        });
    }
    drop(listener);
    tokio::select! {
        _ = graceful.shutdown() => true,
        _ = tokio::time::sleep(grace) => {
            tracing::warn!(grace_ms = grace.as_millis() as u64, "drain did not finish in time; closing remaining connections");
            false
        }
    }
}
