//! The accept loop: hyper connections with header-read timeouts, bounded buffers, and a graceful
//! drain on shutdown (stop accepting, let in-flight requests finish, within a time bound).

use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::webhook::App;

/// Largest request head (line + headers) accepted; hyper answers 431 beyond it.
const MAX_HEAD_BYTES: usize = 16 * 1024;

/// Serves until `shutdown`, then drains for at most `grace`. Returns whether the drain completed.
pub async fn serve(
    listener: TcpListener,
    app: Arc<App>,
    shutdown: CancellationToken,
    grace: Duration,
) -> bool {
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_millis(app.settings.header_timeout_ms))
        .max_buf_size(MAX_HEAD_BYTES.max(8192));
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(64);
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
        let first_byte_within = Duration::from_millis(app.settings.header_timeout_ms);
        let app = Arc::clone(&app);
        let svc = service_fn(move |req| {
            let app = Arc::clone(&app);
            async move { Ok::<_, std::convert::Infallible>(app.handle(req).await) }
        });
        let (builder, watcher) = (builder.clone(), graceful.watcher());
        tokio::spawn(async move {
            // A connection that never sends a byte is closed after the header timeout: idle
            // sockets must not pile up (hyper's header timer only starts with the first byte).
            // `peek` consumes nothing, so hyper still reads the whole request.
            let mut first = [0u8; 1];
            if !matches!(tokio::time::timeout(first_byte_within, stream.peek(&mut first)).await, Ok(Ok(n)) if n > 0)
            {
                return;
            }
            let conn = builder
                .serve_connection(TokioIo::new(stream), svc)
                .into_owned();
            let _ = watcher.watch(conn).await;
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
