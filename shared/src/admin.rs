//! `/health`, `/ready` and `/metrics`: the endpoints Kubernetes probes and Prometheus scrapes.
//!
//! `/health` answers 200 while the process runs. `/ready` answers 200 only while every readiness
//! condition the service registered holds, else 503 naming the failing ones (a load balancer or
//! KEDA then stops sending work). `/metrics` is the Prometheus text format of one registry.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{header, Method, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Named readiness conditions; ready when all hold.
#[derive(Clone, Default)]
pub struct Readiness(Arc<Mutex<BTreeMap<&'static str, bool>>>);

impl Readiness {
    /// Sets one condition.
    pub fn set(&self, name: &'static str, ok: bool) {
        if let Ok(mut m) = self.0.lock() {
            m.insert(name, ok);
        }
    }

    /// The conditions that do not hold (empty = ready). A poisoned lock reads as not ready.
    pub fn failing(&self) -> Vec<&'static str> {
        match self.0.lock() {
            Ok(m) => m.iter().filter(|(_, ok)| !**ok).map(|(k, _)| *k).collect(),
            Err(_) => vec!["readiness-state"],
        }
    }

    /// Whether every condition holds.
    pub fn is_ready(&self) -> bool {
        self.failing().is_empty()
    }
}

/// What the admin endpoints serve.
#[derive(Clone)]
pub struct Admin {
    pub readiness: Readiness,
    pub registry: Arc<Registry>,
}

/// A full-body response.
pub fn text(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    r
}

impl Admin {
    /// Answers `GET /health`, `/ready`, `/metrics`; `None` for any other path, so a service can
    /// mount these beside its own routes.
    pub fn respond(&self, method: &Method, path: &str) -> Option<Response<Full<Bytes>>> {
        if !matches!(path, "/health" | "/ready" | "/metrics") {
            return None;
        }
        if method != Method::GET && method != Method::HEAD {
            return Some(text(
                StatusCode::METHOD_NOT_ALLOWED,
                "text/plain",
                "use GET\n",
            ));
        }
        Some(match path {
            "/health" => text(StatusCode::OK, "text/plain", "ok\n"),
            "/ready" => {
                let failing = self.readiness.failing();
                if failing.is_empty() {
                    text(StatusCode::OK, "text/plain", "ready\n")
                } else {
                    text(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "text/plain",
                        format!("not ready: {}\n", failing.join(", ")),
                    )
                }
            }
            _ => {
                let mut out = String::new();
                match prometheus_client::encoding::text::encode(&mut out, &self.registry) {
                    Ok(()) => text(
                        StatusCode::OK,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        out,
                    ),
                    Err(_) => text(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "text/plain",
                        "metrics encoding failed\n",
                    ),
                }
            }
        })
    }

    /// Serves only the admin endpoints on `listener` until `shutdown` fires.
    pub async fn serve(self, listener: TcpListener, shutdown: CancellationToken) {
        loop {
            let accepted = tokio::select! {
                _ = shutdown.cancelled() => return,
                a = listener.accept() => a,
            };
            let Ok((stream, _peer)) = accepted else {
                continue;
            };
            let admin = self.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req: http::Request<Incoming>| {
                    let resp = admin
                        .respond(req.method(), req.uri().path())
                        .unwrap_or_else(|| {
                            text(StatusCode::NOT_FOUND, "text/plain", "not found\n")
                        });
                    async move { Ok::<_, std::convert::Infallible>(resp) }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    }
}

/// Binds a listener, naming the configuration key on failure.
pub async fn bind(addr: SocketAddr, key: &'static str) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await.map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!("cannot listen on {addr} (configuration key `{key}`): {e}"),
        )
    })
}

/// Registers `carhook_build_info{service, version} 1`: which build of which service runs where (one
/// name for every service, so a dashboard or alert joins any series onto it by instance).
pub fn register_build_info(registry: &mut Registry, service: &'static str) {
    registry.register(
        "carhook_build",
        "Always 1; the service and the build's version as labels",
        prometheus_client::metrics::info::Info::new(vec![
            ("service", service.to_string()),
            ("version", env!("CARGO_PKG_VERSION").to_string()),
        ]),
    );
}
