//! `/metrics`, `/healthz` and `/readyz` over HTTP (axum) on `daemon.metrics_listen`.
//!
//! `/metrics` speaks OpenMetrics to clients that accept it (Prometheus asks for it) and the
//! Prometheus text format 0.0.4 to everything else (curl, `promtool check metrics`).

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

use crate::metrics::{OPENMETRICS_CONTENT_TYPE, PROMETHEUS_TEXT_CONTENT_TYPE};
use crate::observe::Observer;

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("cannot listen on {addr} for /metrics: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("metrics HTTP server failed: {0}")]
    Serve(std::io::Error),
}

/// The routes, for a caller that serves them itself (tests, the benchmark).
pub fn router(observer: Arc<Observer>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(observer)
}

pub async fn bind(addr: SocketAddr) -> Result<tokio::net::TcpListener, HttpError> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| HttpError::Bind { addr, source })
}

/// Serves until `shutdown` completes.
pub async fn serve(
    listener: tokio::net::TcpListener,
    observer: Arc<Observer>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), HttpError> {
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "serving /metrics, /healthz, /readyz");
    }
    axum::serve(listener, router(observer))
        .with_graceful_shutdown(shutdown)
        .await
        .map_err(HttpError::Serve)
}

fn wants_openmetrics(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("application/openmetrics-text"))
}

async fn metrics(State(observer): State<Arc<Observer>>, headers: HeaderMap) -> Response {
    let m = observer.metrics();
    let (body, content_type) = if wants_openmetrics(&headers) {
        (m.encode(), OPENMETRICS_CONTENT_TYPE)
    } else {
        (m.encode_prometheus_text(), PROMETHEUS_TEXT_CONTENT_TYPE)
    };
    match body {
        Ok(body) => ([(header::CONTENT_TYPE, content_type)], body).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(observer): State<Arc<Observer>>) -> Response {
    let r = observer.readiness();
    if r.ready {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        let mut body = String::from("not ready\n");
        for (handler, why) in &r.failing {
            body.push_str(&format!("{handler}: {why}\n"));
        }
        (StatusCode::SERVICE_UNAVAILABLE, body).into_response()
    }
}
