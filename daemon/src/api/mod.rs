//! The HTTP API: data plane (both Azure generations), management API for
//! pools, health and metrics; served on a Unix socket and optionally TCP.

mod data_plane;
pub mod error;
mod management;
pub mod query;
mod upload;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

use crate::config::PoolFullStatus;
use crate::metrics::Metrics;
use crate::pool::Pools;
use error::ApiError;

pub struct AppState {
    pub pools: Arc<Pools>,
    pub metrics: Arc<Metrics>,
    pub api_keys: Vec<String>,
    pub pool_full_status: PoolFullStatus,
    /// Base of the URLs reported as `poolManagementEndpoint`.
    pub endpoint_base: String,
    pub backend_kind: &'static str,
    pub isolation: String,
    /// This host's KVM and why pools use the backend they do.
    pub host: Arc<crate::host::HostReport>,
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot create the socket directory {path}")]
    SocketDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("another process is already serving on {0}: stop it first (is another `sessiond serve` running?)")]
    SocketInUse(PathBuf),
    #[error("cannot bind {what}")]
    Bind {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("server failed")]
    Serve(#[source] std::io::Error),
}

pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .merge(management::routes())
        .fallback(data_plane::handle)
        .layer(axum::middleware::from_fn_with_state(
            Arc::clone(&state),
            auth_and_count,
        ))
        .with_state(state)
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Checks the bearer token (when keys are configured) and counts error
/// responses by their `x-ms-error-code`.
async fn auth_and_count(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let resp = if state.api_keys.is_empty() || req.uri().path() == "/health" {
        next.run(req).await
    } else {
        match check_bearer(&state.api_keys, req.headers().get(header::AUTHORIZATION)) {
            Ok(()) => next.run(req).await,
            Err(e) => {
                drain_small_body(req.into_body()).await;
                e.into_response()
            }
        }
    };
    if let Some(code) = resp
        .headers()
        .get("x-ms-error-code")
        .and_then(|v| v.to_str().ok())
    {
        state
            .metrics
            .errors
            .get_or_create(&crate::metrics::ErrorLabels {
                code: code.to_string(),
            })
            .inc();
    }
    resp
}

/// Reads a refused request's body (when small) so the client's keep-alive
/// connection stays usable: hyper closes a connection whose request body
/// was left unread, and a client that already sent its next request on it
/// sees a disconnect instead of an answer.
pub async fn drain_small_body(body: axum::body::Body) {
    const DRAIN_LIMIT: usize = 1 << 20;
    let _ = axum::body::to_bytes(body, DRAIN_LIMIT).await;
}

fn check_bearer(keys: &[String], header: Option<&header::HeaderValue>) -> Result<(), ApiError> {
    let Some(value) = header else {
        return Err(ApiError::unauthorized(
            "missing Authorization header: send 'Authorization: Bearer <api key>'",
        ));
    };
    let token = value
        .to_str()
        .ok()
        .and_then(|v| {
            let (scheme, rest) = v.split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
        })
        .ok_or_else(|| {
            ApiError::unauthorized("malformed Authorization header: expected 'Bearer <api key>'")
        })?;
    if keys
        .iter()
        .any(|k| constant_time_eq(k.as_bytes(), token.as_bytes()))
    {
        Ok(())
    } else {
        Err(ApiError::unauthorized("invalid API key"))
    }
}

async fn health(State(state): State<Arc<AppState>>) -> Response {
    axum::Json(serde_json::json!({
        "status": "ok",
        "version": env!("CARGO_PKG_VERSION"),
        "backend": state.backend_kind,
        "isolation": state.isolation,
        "host": &*state.host,
        "pools": state.pools.list().len(),
    }))
    .into_response()
}

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    (
        StatusCode::OK,
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.encode(),
    )
        .into_response()
}

/// Binds the API's Unix socket with mode 0660, replacing a stale file.
pub fn bind_unix(path: &Path) -> Result<tokio::net::UnixListener, ServeError> {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|source| ServeError::SocketDir {
            path: dir.to_path_buf(),
            source,
        })?;
    }
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if meta.file_type().is_socket() {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(ServeError::SocketInUse(path.to_path_buf()));
            }
            let _ = std::fs::remove_file(path);
        }
    }
    let bind_err = |source| ServeError::Bind {
        what: path.display().to_string(),
        source,
    };
    let listener = tokio::net::UnixListener::bind(path).map_err(bind_err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660)).map_err(bind_err)?;
    Ok(listener)
}

/// Serves `router` on both listeners until `shutdown` resolves.
pub async fn serve(
    router: Router,
    unix: tokio::net::UnixListener,
    tcp: Option<tokio::net::TcpListener>,
    shutdown: tokio_util::sync::CancellationToken,
) -> Result<(), ServeError> {
    let s1 = shutdown.clone();
    let unix_srv = axum::serve(unix, router.clone())
        .with_graceful_shutdown(async move { s1.cancelled().await });
    match tcp {
        Some(tcp) => {
            let s2 = shutdown.clone();
            let tcp_srv = axum::serve(tcp, router)
                .with_graceful_shutdown(async move { s2.cancelled().await });
            let (a, b) = tokio::join!(unix_srv, tcp_srv);
            a.map_err(ServeError::Serve)?;
            b.map_err(ServeError::Serve)
        }
        None => unix_srv.await.map_err(ServeError::Serve),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_tokens() {
        let keys = vec!["secret-key-1".to_string()];
        let hv = |s: &str| header::HeaderValue::from_str(s).unwrap();
        assert!(check_bearer(&keys, Some(&hv("Bearer secret-key-1"))).is_ok());
        assert!(check_bearer(&keys, Some(&hv("bearer secret-key-1"))).is_ok());
        let e = check_bearer(&keys, None).unwrap_err();
        assert_eq!(e.status, StatusCode::UNAUTHORIZED);
        assert!(e.message.contains("missing"));
        assert!(check_bearer(&keys, Some(&hv("Bearer wrong"))).is_err());
        assert!(check_bearer(&keys, Some(&hv("Basic secret-key-1"))).is_err());
        assert!(check_bearer(&keys, Some(&hv("secret-key-1"))).is_err());
    }
}
