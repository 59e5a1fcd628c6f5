//! The agent's HTTP/1.1 API (routes listed in [`crate::proto`]).

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path as UrlPath, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::StreamExt;
use serde::de::DeserializeOwned;

use crate::files::{DataDir, FilesError, RelPath};
use crate::proto::{
    AgentError, Health, InitRequest, PythonRequest, ShellRequest, MAX_UPLOAD_BYTES,
};
use crate::python::Python;
use crate::shell::{self, ShellError};

/// Largest JSON request body (code of a cell, a command).
const MAX_JSON_BODY: usize = 64 * 1024 * 1024;

pub struct AgentState {
    pub python: Arc<Python>,
    pub data: Arc<DataDir>,
    pub data_dir: PathBuf,
    env: std::sync::Mutex<Vec<(String, String)>>,
}

impl AgentState {
    pub fn new(python: Arc<Python>, data: DataDir) -> Arc<AgentState> {
        Arc::new(AgentState {
            python,
            data_dir: data.path().to_path_buf(),
            data: Arc::new(data),
            env: std::sync::Mutex::new(Vec::new()),
        })
    }

    fn env(&self) -> Vec<(String, String)> {
        self.env.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// An error reply: status plus an [`AgentError`] body.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    body: AgentError,
}

impl ApiError {
    fn new(status: StatusCode, code: &str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            body: AgentError {
                code: code.to_string(),
                message: message.into(),
            },
        }
    }

    fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "BadRequest", message)
    }

    fn internal(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "Internal", message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(self.body)).into_response()
    }
}

impl From<FilesError> for ApiError {
    fn from(e: FilesError) -> ApiError {
        let message = crate::output::error_chain(&e);
        match e {
            FilesError::InvalidPath { .. } => {
                ApiError::new(StatusCode::BAD_REQUEST, "InvalidPath", message)
            }
            FilesError::NotFound(_) => {
                ApiError::new(StatusCode::NOT_FOUND, "FileNotFound", message)
            }
            FilesError::TooLarge { .. } => {
                ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "PayloadTooLarge", message)
            }
            FilesError::NoSpace(_) => {
                ApiError::new(StatusCode::INSUFFICIENT_STORAGE, "NoSpace", message)
            }
            FilesError::Io { .. } => ApiError::internal(message),
        }
    }
}

impl From<ShellError> for ApiError {
    fn from(e: ShellError) -> ApiError {
        ApiError::bad_request(e.to_string())
    }
}

pub fn router(state: Arc<AgentState>) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/init", post(init))
        .route("/execute/python", post(execute_python))
        .route("/execute/shell", post(execute_shell))
        .route("/files", get(list_files))
        .route(
            "/files/{*path}",
            get(download).put(upload).delete(delete_file),
        )
        .route("/stat/{*path}", get(stat_file))
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "BadRequest", "no such route") })
        .with_state(state)
}

async fn read_json<T: DeserializeOwned>(body: Body) -> Result<T, ApiError> {
    let bytes = axum::body::to_bytes(body, MAX_JSON_BODY)
        .await
        .map_err(|e| {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "PayloadTooLarge",
                format!("request body over {MAX_JSON_BODY} bytes or unreadable: {e}"),
            )
        })?;
    serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::bad_request(format!("malformed request body: {e}")))
}

fn health_of(state: &AgentState) -> Health {
    Health {
        status: "ok".to_string(),
        python_ready: state.python.ready(),
        version: env!("CARGO_PKG_VERSION").to_string(),
    }
}

async fn health(State(state): State<Arc<AgentState>>) -> Json<Health> {
    Json(health_of(&state))
}

async fn init(State(state): State<Arc<AgentState>>, body: Body) -> Result<Json<Health>, ApiError> {
    let req: InitRequest = read_json(body).await?;
    if let Some(hex) = &req.entropy_hex {
        let bytes =
            decode_hex(hex).ok_or_else(|| ApiError::bad_request("entropy_hex is not valid hex"))?;
        // Writing to /dev/urandom mixes the bytes into the pool (without
        // crediting entropy), which an unprivileged process may do.
        if let Err(e) = std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/urandom")
            .and_then(|mut f| f.write_all(&bytes))
        {
            tracing::warn!(error = %e, "cannot mix entropy into /dev/urandom");
        }
    }
    if let Some(ms) = req.unix_time_ms {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0);
        // The agent is unprivileged and cannot set the clock; skew is logged.
        tracing::info!(skew_ms = now - ms as i64, "host clock received");
    }
    for (k, _) in &req.env {
        if k.is_empty() || k.contains('=') || k.contains('\0') {
            return Err(ApiError::bad_request(format!(
                "invalid environment variable name {k:?}"
            )));
        }
    }
    if req.env.iter().any(|(_, v)| v.contains('\0')) {
        return Err(ApiError::bad_request(
            "environment values cannot contain NUL",
        ));
    }
    {
        let mut env = state.env.lock().unwrap_or_else(|e| e.into_inner());
        for (k, v) in &req.env {
            env.retain(|(ek, _)| ek != k);
            env.push((k.clone(), v.clone()));
        }
    }
    state.python.set_env(&req.env);
    state.python.request_reseed();
    if let Some(id) = &req.session_id {
        tracing::info!(session = %id, "sandbox assigned to session");
    }
    Ok(Json(health_of(&state)))
}

fn decode_hex(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 == 1 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

async fn execute_python(
    State(state): State<Arc<AgentState>>,
    body: Body,
) -> Result<Response, ApiError> {
    let req: PythonRequest = read_json(body).await?;
    Ok(Json(state.python.execute(req).await).into_response())
}

async fn execute_shell(
    State(state): State<Arc<AgentState>>,
    body: Body,
) -> Result<Response, ApiError> {
    let req: ShellRequest = read_json(body).await?;
    let env = state.env();
    let data_dir = state.data_dir.clone();
    // Own task: a caller that goes away must not leave the command unreaped.
    let resp = tokio::spawn(async move { shell::run(req, &data_dir, &env).await })
        .await
        .map_err(|e| ApiError::internal(format!("shell task failed: {e}")))??;
    Ok(Json(resp).into_response())
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, FilesError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::internal(format!("file task failed: {e}")))?
        .map_err(ApiError::from)
}

async fn list_files(State(state): State<Arc<AgentState>>) -> Result<Response, ApiError> {
    let data = Arc::clone(&state.data);
    let entries = blocking(move || data.list()).await?;
    Ok(Json(entries).into_response())
}

async fn stat_file(
    State(state): State<Arc<AgentState>>,
    UrlPath(path): UrlPath<String>,
) -> Result<Response, ApiError> {
    let rel = RelPath::parse(&path)?;
    let data = Arc::clone(&state.data);
    let entry = blocking(move || data.stat(&rel)).await?;
    Ok(Json(entry).into_response())
}

/// GET (and HEAD, which axum answers from the same handler without a body).
async fn download(
    State(state): State<Arc<AgentState>>,
    UrlPath(path): UrlPath<String>,
) -> Result<Response, ApiError> {
    let rel = RelPath::parse(&path)?;
    let data = Arc::clone(&state.data);
    let open = blocking(move || data.open_read(&rel)).await?;
    let stream = tokio_util::io::ReaderStream::new(tokio::fs::File::from_std(open.file));
    Response::builder()
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .header(header::CONTENT_LENGTH, open.entry.size)
        .header("x-last-modified", open.entry.last_modified)
        .body(Body::from_stream(stream))
        .map_err(|e| ApiError::internal(e.to_string()))
}

async fn upload(
    State(state): State<Arc<AgentState>>,
    UrlPath(path): UrlPath<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let rel = RelPath::parse(&path)?;
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_UPLOAD_BYTES) {
        return Err(FilesError::TooLarge {
            limit: MAX_UPLOAD_BYTES,
        }
        .into());
    }
    let data = Arc::clone(&state.data);
    let mut up = blocking(move || data.begin_upload(&rel)).await?;
    let file = up
        .take_file()
        .ok_or_else(|| ApiError::internal("upload file already taken"))?;
    let mut file = tokio::fs::File::from_std(file);
    let mut stream = body.into_data_stream();
    let mut written: u64 = 0;
    while let Some(chunk) = stream.next().await {
        let chunk =
            chunk.map_err(|e| ApiError::bad_request(format!("upload body unreadable: {e}")))?;
        written += chunk.len() as u64;
        if written > MAX_UPLOAD_BYTES {
            return Err(FilesError::TooLarge {
                limit: MAX_UPLOAD_BYTES,
            }
            .into());
        }
        tokio::io::AsyncWriteExt::write_all(&mut file, &chunk)
            .await
            .map_err(|e| ApiError::from(up.write_error(e)))?;
    }
    // tokio's File finishes writes in the background; flush surfaces ENOSPC.
    tokio::io::AsyncWriteExt::flush(&mut file)
        .await
        .map_err(|e| ApiError::from(up.write_error(e)))?;
    drop(file);
    let entry = blocking(move || up.commit()).await?;
    Ok((StatusCode::OK, Json(entry)).into_response())
}

async fn delete_file(
    State(state): State<Arc<AgentState>>,
    UrlPath(path): UrlPath<String>,
) -> Result<Response, ApiError> {
    let rel = RelPath::parse(&path)?;
    let data = Arc::clone(&state.data);
    blocking(move || data.delete(&rel)).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}
