//! The Azure-compatible data plane, reached under `/pools/{pool}` or the
//! Azure-shaped `/subscriptions/{s}/resourceGroups/{rg}/sessionPools/{pool}`
//! (optionally with `/providers/Microsoft.App`). Paths are parsed here by
//! hand so that every malformed request gets the Azure error envelope.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use serde_json::{json, Value};
use sessiond_agent::proto::{
    ExecStatus, FileEntry, PythonRequest, PythonResponse, ShellRequest, ShellResponse,
};
use tracing::Instrument;

use super::error::ApiError;
use super::query::{
    parse_api_version, percent_decode, validate_identifier, ApiVersion, Generation, Query,
};
use super::upload;
use super::AppState;
use crate::agent_client::{AgentCallError, AgentClient};
use crate::config::PoolFullStatus;
use crate::pool::{Pool, PoolError};
use crate::pool_spec::ContainerType;
use crate::session::{CallGuard, Session};

/// Longest execution Azure allows; longer requested timeouts are capped.
pub const MAX_TIMEOUT_S: u64 = 220;
/// Largest JSON request body (code) accepted.
const MAX_JSON_BODY: usize = 16 << 20;
/// Default `outputStreamsMaxLength` of the 2025-10 API, in characters.
const DEFAULT_STREAM_MAX_2025_10: usize = 4096;

/// Splits a request path into (pool, remaining raw segments).
fn split_pool_path(path: &str) -> Option<(&str, Vec<&str>)> {
    let segs: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let eq = |a: &str, b: &str| a.eq_ignore_ascii_case(b);
    if segs.len() >= 2 && segs[0] == "pools" {
        return Some((segs[1], segs[2..].to_vec()));
    }
    if segs.len() >= 6 && eq(segs[0], "subscriptions") && eq(segs[2], "resourceGroups") {
        if eq(segs[4], "sessionPools") {
            return Some((segs[5], segs[6..].to_vec()));
        }
        if segs.len() >= 8
            && eq(segs[4], "providers")
            && eq(segs[5], "Microsoft.App")
            && eq(segs[6], "sessionPools")
        {
            return Some((segs[7], segs[8..].to_vec()));
        }
    }
    None
}

/// The data-plane operations.
#[derive(Debug, PartialEq, Eq)]
enum Op {
    ExecuteV1,
    ExecuteV2,
    GetExecution(String),
    Upload,
    ListFiles,
    FileMeta(String),
    Download(String),
    DeleteFile(String),
    GetSession,
    DeleteSession,
}

fn route(method: &Method, rest: &[String], generation: Generation) -> Result<Op, String> {
    let r: Vec<&str> = rest.iter().map(String::as_str).collect();
    let join = |s: &[&str]| s.join("/");
    let op = match (method, r.as_slice()) {
        (&Method::POST, ["code", "execute"]) => Op::ExecuteV1,
        (&Method::POST, ["executions"]) => Op::ExecuteV2,
        (&Method::GET, ["executions", id]) => Op::GetExecution(id.to_string()),
        (&Method::POST, ["files", "upload"]) | (&Method::POST, ["files"]) => Op::Upload,
        (&Method::GET, ["files"]) => Op::ListFiles,
        (&Method::GET, ["files", "content", name @ ..])
            if !name.is_empty()
                && (generation == Generation::One || name.last() != Some(&"content")) =>
        {
            Op::Download(join(name))
        }
        (&Method::GET, ["files", name @ .., "content"]) if !name.is_empty() => {
            Op::Download(join(name))
        }
        (&Method::GET, ["files", name @ ..]) if !name.is_empty() => Op::FileMeta(join(name)),
        (&Method::DELETE, ["files", name @ ..]) if !name.is_empty() => Op::DeleteFile(join(name)),
        (&Method::GET, ["session"]) => Op::GetSession,
        (&Method::DELETE, ["session"]) => Op::DeleteSession,
        _ => {
            let known = matches!(
                r.as_slice(),
                ["code", "execute"] | ["executions", ..] | ["files", ..] | ["session"]
            );
            let path = format!("/{}", r.join("/"));
            return Err(if known {
                format!("method {method} is not allowed on {path}")
            } else {
                format!("unknown path {path}: expected code/execute, executions, files or session under the pool")
            });
        }
    };
    Ok(op)
}

struct Ctx {
    state: Arc<AppState>,
    pool: Arc<Pool>,
    identifier: String,
    version: ApiVersion,
    query: Query,
}

pub async fn handle(State(state): State<Arc<AppState>>, req: Request) -> Response {
    let path = req.uri().path().to_string();
    let Some((pool_raw, rest_raw)) = split_pool_path(&path) else {
        super::drain_small_body(req.into_body()).await;
        return ApiError::new(
            StatusCode::NOT_FOUND,
            "NotFound",
            format!("no route for {path}: data-plane requests go to /pools/<pool>/..., pool management to /management/pools"),
        )
        .into_response();
    };
    let pool_name = percent_decode(pool_raw).unwrap_or_else(|_| pool_raw.to_string());
    let Some(pool) = state.pools.get(&pool_name) else {
        super::drain_small_body(req.into_body()).await;
        return ApiError::pool_not_found(&pool_name).into_response();
    };
    let query = Query::parse(req.uri().query());
    let prepared = (|| {
        let mut rest = Vec::with_capacity(rest_raw.len());
        for seg in rest_raw.iter().filter(|s| !s.is_empty()) {
            rest.push(percent_decode(seg).map_err(ApiError::validation)?);
        }
        let version = parse_api_version(
            query
                .text("api-version")
                .map_err(|e| ApiError::validation(e).with_target("api-version"))?,
        )
        .map_err(|e| ApiError::validation(e).with_target("api-version"))?;
        let op = route(req.method(), &rest, version.generation).map_err(ApiError::validation)?;
        let identifier = validate_identifier(
            query
                .text("identifier")
                .map_err(|e| ApiError::validation(e).with_target("identifier"))?,
        )
        .map_err(|e| ApiError::validation(e).with_target("identifier"))?;
        Ok::<_, ApiError>((op, version, identifier))
    })();
    let (op, version, identifier) = match prepared {
        Ok(p) => p,
        Err(e) => {
            super::drain_small_body(req.into_body()).await;
            return e.into_response();
        }
    };
    let span = tracing::info_span!("session", pool = %pool.name, identifier = %identifier);
    let ctx = Ctx {
        state,
        pool,
        identifier,
        version,
        query,
    };
    async move {
        let (parts, body) = req.into_parts();
        let result = match op {
            Op::ExecuteV1 => execute_v1(&ctx, body).await,
            Op::ExecuteV2 => execute_v2(&ctx, body).await,
            Op::GetExecution(id) => get_execution(&ctx, &id),
            Op::Upload => upload_files(&ctx, &parts.headers, body).await,
            Op::ListFiles => list_files(&ctx).await,
            Op::FileMeta(name) => file_meta(&ctx, &name).await,
            Op::Download(name) => download(&ctx, &name).await,
            Op::DeleteFile(name) => delete_file(&ctx, &name).await,
            Op::GetSession => get_session(&ctx),
            Op::DeleteSession => delete_session(&ctx),
        };
        match result {
            Ok(r) => r,
            Err(e) => {
                if e.status.is_server_error() {
                    tracing::warn!(code = %e.code, message = %e.message, "request failed");
                } else {
                    tracing::debug!(code = %e.code, message = %e.message, "request refused");
                }
                e.into_response()
            }
        }
    }
    .instrument(span)
    .await
}

impl Ctx {
    /// The caller's session, allocated on first use, with a call guard that
    /// keeps it from expiring while the request runs.
    async fn session(&self) -> Result<(Arc<Session>, AgentClient, CallGuard), ApiError> {
        let (session, client) = self
            .pool
            .session(&self.identifier)
            .await
            .map_err(|e| self.pool_error(e))?;
        let guard = session.begin_call();
        Ok((session, client, guard))
    }

    /// The caller's session only if it exists already.
    fn existing(&self) -> Result<Arc<Session>, ApiError> {
        self.pool
            .existing(&self.identifier)
            .ok_or_else(|| ApiError::session_not_found(&self.identifier))
    }

    fn pool_error(&self, e: PoolError) -> ApiError {
        match e {
            PoolError::Full { .. } => {
                let status = match self.state.pool_full_status {
                    PoolFullStatus::TooManyRequests => StatusCode::TOO_MANY_REQUESTS,
                    PoolFullStatus::NotFound => StatusCode::NOT_FOUND,
                };
                let mut err = ApiError::new(status, "SessionPoolFull", e.to_string());
                err.retry_after_s = Some(self.retry_after_s());
                err
            }
            PoolError::SessionNotFound(id) => ApiError::session_not_found(&id),
            PoolError::NotFound(p) => ApiError::pool_not_found(&p),
            PoolError::Allocation(_) | PoolError::Closing(_) => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "SessionAllocationFailed",
                e.to_string(),
            ),
            other => ApiError::internal(crate::error_chain(&other)),
        }
    }

    /// Seconds until the first session of the pool would expire if idle.
    fn retry_after_s(&self) -> u64 {
        let cooldown = self.pool.spec().cooldown;
        let now = chrono::Utc::now();
        self.pool
            .sessions()
            .iter()
            .map(|s| (s.expires_at(cooldown) - now).num_seconds())
            .min()
            .unwrap_or(1)
            .clamp(1, cooldown.as_secs().max(1) as i64) as u64
    }

    /// Maps an agent failure; a sandbox that died or stopped answering
    /// takes its session with it.
    fn agent_error(&self, session: &Arc<Session>, e: AgentCallError) -> ApiError {
        agent_error(&self.pool, &self.identifier, session, e)
    }

    fn count_execution(&self, kind: &str, status: &str) {
        self.state
            .metrics
            .executions
            .get_or_create(&crate::metrics::ExecLabels {
                pool: self.pool.name.clone(),
                kind: kind.to_string(),
                status: status.to_string(),
            })
            .inc();
    }
}

/// Maps an agent failure to the caller's error. Only the agent's verdicts on
/// the request (400, 404, 409, 413, 507, already sanitized by the client)
/// pass through; a deadline missed destroys the session, since an agent
/// that stopped answering would otherwise pin a pool slot for good.
fn agent_error(
    pool: &Pool,
    identifier: &str,
    session: &Arc<Session>,
    e: AgentCallError,
) -> ApiError {
    match e {
        AgentCallError::Agent {
            status,
            code,
            message,
        } => ApiError::new(status, &code, message),
        AgentCallError::Unresponsive { what, after } => {
            tracing::warn!(sandbox = ?session.sandbox_id(), what, after_s = after.as_secs_f64(), "sandbox agent unresponsive; destroying the session");
            pool.remove_session(session, "agent unresponsive");
            ApiError::new(
                StatusCode::BAD_GATEWAY,
                "SessionSandboxUnresponsive",
                format!(
                    "the sandbox of session {identifier:?} did not answer {what} within {} s (stopped, hung or taken over by code in it); the session was destroyed with its files, and the next call with this identifier starts a new session",
                    after.as_secs_f64()
                ),
            )
        }
        // Removed on purpose while this call ran: deleted, pool deleted,
        // or the daemon is stopping.
        e if e.is_transport() && session.is_removed() => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "SessionTerminated",
            format!(
                "session {identifier:?} was deleted (or sessiond is shutting down) while this call ran; the next call with this identifier starts a new session"
            ),
        ),
        e if e.is_transport() && pool.remove_if_dead(session) => ApiError::new(
            StatusCode::BAD_GATEWAY,
            "SessionSandboxExited",
            format!(
                "the sandbox of session {identifier:?} exited unexpectedly (killed or crashed); the session was removed with its files, and the next call with this identifier starts a new session"
            ),
        ),
        e @ AgentCallError::Failed { .. } => ApiError::new(
            StatusCode::BAD_GATEWAY,
            "SessionAgentError",
            crate::error_chain(&e),
        ),
        e => ApiError::new(
            StatusCode::BAD_GATEWAY,
            "SessionAgentUnavailable",
            format!("the session's sandbox did not answer: {}", crate::error_chain(&e)),
        ),
    }
}

async fn read_json(body: Body) -> Result<Value, ApiError> {
    let bytes = axum::body::to_bytes(body, MAX_JSON_BODY)
        .await
        .map_err(|_| {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "PayloadTooLarge",
                format!(
                    "the request body is larger than {} MiB",
                    MAX_JSON_BODY >> 20
                ),
            )
        })?;
    if bytes.is_empty() {
        return Err(ApiError::validation(
            "the request body is empty: send a JSON object",
        ));
    }
    let v: Value = serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::validation(format!("the request body is not valid JSON: {e}")))?;
    if !v.is_object() {
        return Err(ApiError::validation(
            "the request body must be a JSON object",
        ));
    }
    Ok(v)
}

fn opt_str<'a>(obj: &'a Value, key: &str) -> Result<Option<&'a str>, ApiError> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(ApiError::validation(format!("{key} must be a string")).with_target(key)),
    }
}

fn check_enum(obj: &Value, key: &str, allowed: &str) -> Result<(), ApiError> {
    match opt_str(obj, key)? {
        Some(v) if !v.eq_ignore_ascii_case(allowed) => Err(ApiError::not_supported(format!(
            "{key} {v:?} is not supported: only {allowed:?}"
        ))
        .with_target(key)),
        _ => Ok(()),
    }
}

fn timeout_ms(obj: &Value) -> Result<Option<u64>, ApiError> {
    match obj.get("timeoutInSeconds") {
        None | Some(Value::Null) => Ok(None),
        Some(v) => match v.as_f64() {
            Some(s) if s > 0.0 => Ok(Some((s.min(MAX_TIMEOUT_S as f64) * 1000.0) as u64)),
            _ => Err(
                ApiError::validation("timeoutInSeconds must be a positive number of seconds")
                    .with_target("timeoutInSeconds"),
            ),
        },
    }
}

/// Says plainly why an execution failed when the agent timed out or restarted.
fn explain(stderr: &str, status: ExecStatus, restarted: bool, timeout: Option<u64>) -> String {
    let mut s = stderr.to_string();
    let mut add = |line: String| {
        if !s.is_empty() && !s.ends_with('\n') {
            s.push('\n');
        }
        s.push_str(&line);
        s.push('\n');
    };
    // The agent usually says so itself; add a line only when it did not.
    if status == ExecStatus::Timeout && !stderr.contains("timed out") {
        let secs = timeout.unwrap_or(sessiond_agent::proto::DEFAULT_TIMEOUT_MS) as f64 / 1000.0;
        add(format!(
            "TimeoutError: execution timed out after {secs} seconds and was interrupted"
        ));
    }
    if restarted {
        add(
            "The Python interpreter was restarted; variables from earlier executions are lost."
                .into(),
        );
    }
    s
}

fn ms(duration_ms: u64) -> Value {
    json!(duration_ms)
}

async fn run_python(
    ctx: &Ctx,
    session: &Arc<Session>,
    client: &AgentClient,
    code: &str,
    timeout: Option<u64>,
) -> Result<PythonResponse, ApiError> {
    let _turn = session.python_turn().await;
    let resp = client
        .python(&PythonRequest {
            code: code.to_string(),
            timeout_ms: timeout,
            max_output: None,
        })
        .await
        .map_err(|e| ctx.agent_error(session, e))?;
    ctx.count_execution("python", &format!("{:?}", resp.status));
    Ok(resp)
}

async fn run_shell(
    ctx: &Ctx,
    session: &Arc<Session>,
    client: &AgentClient,
    req: ShellRequest,
) -> Result<ShellResponse, ApiError> {
    let resp = client
        .shell(&req)
        .await
        .map_err(|e| ctx.agent_error(session, e))?;
    ctx.count_execution("shell", &format!("{:?}", resp.status));
    Ok(resp)
}

async fn execute_v1(ctx: &Ctx, body: Body) -> Result<Response, ApiError> {
    let body = read_json(body).await?;
    let props = match body.get("properties") {
        Some(p @ Value::Object(_)) => p,
        Some(_) => return Err(ApiError::validation("properties must be a JSON object")),
        None => &body,
    };
    check_enum(props, "codeInputType", "inline")?;
    check_enum(props, "executionType", "synchronous")?;
    let code = opt_str(props, "code")?
        .ok_or_else(|| ApiError::validation("properties.code is required").with_target("code"))?;
    let timeout = timeout_ms(props)?;
    let (session, client, _guard) = ctx.session().await?;
    let (status, stdout, stderr, result, display, duration) = match ctx.pool.spec().container_type {
        ContainerType::PythonLTS => {
            let r = run_python(ctx, &session, &client, code, timeout).await?;
            let stderr = explain(&r.stderr, r.status, r.restarted, timeout);
            (
                r.status == ExecStatus::Success,
                r.stdout,
                stderr,
                r.result,
                r.display,
                r.duration_ms,
            )
        }
        ContainerType::Shell => {
            let r = run_shell(
                ctx,
                &session,
                &client,
                ShellRequest {
                    command: Some(code.to_string()),
                    argv: None,
                    stdin: None,
                    timeout_ms: timeout,
                    max_output: None,
                },
            )
            .await?;
            let stderr = explain(&r.stderr, r.status, false, timeout);
            let ok = r.status == ExecStatus::Success && r.exit_code == Some(0);
            (ok, r.stdout, stderr, json!(""), Vec::new(), r.duration_ms)
        }
    };
    let mut props = json!({
        "$id": "2",
        "status": if status { "Success" } else { "Failure" },
        "stdout": stdout,
        "stderr": stderr,
        "result": result,
        "executionResult": result,
        "executionTimeInMilliseconds": ms(duration),
    });
    if !display.is_empty() {
        props["display"] = Value::Array(display);
    }
    Ok(axum::Json(json!({"$id": "1", "properties": props})).into_response())
}

fn truncate_chars(s: String, max: Option<usize>) -> String {
    match max {
        Some(m) if s.chars().count() > m => s.chars().take(m).collect(),
        _ => s,
    }
}

fn shell_request(body: &Value, timeout: Option<u64>) -> Result<Option<ShellRequest>, ApiError> {
    let stdin = opt_str(body, "stdin")?.map(str::to_string);
    if let Some(cmd) = opt_str(body, "shellCommand")? {
        return Ok(Some(ShellRequest {
            command: Some(cmd.to_string()),
            argv: None,
            stdin,
            timeout_ms: timeout,
            max_output: None,
        }));
    }
    let argv: Option<Vec<String>> = match body.get("execCommandAndArgs") {
        None | Some(Value::Null) => None,
        Some(Value::Array(a)) => Some(
            a.iter()
                .map(|v| v.as_str().map(str::to_string))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| {
                    ApiError::validation("execCommandAndArgs must be a list of strings")
                })?,
        ),
        Some(Value::Object(o)) => {
            let cmd = o
                .get("command")
                .or_else(|| o.get("execCommand"))
                .and_then(Value::as_str)
                .ok_or_else(|| {
                    ApiError::validation("execCommandAndArgs.command must be a string")
                })?;
            let mut argv = vec![cmd.to_string()];
            if let Some(args) = o.get("args") {
                let args = args
                    .as_array()
                    .and_then(|a| {
                        a.iter()
                            .map(|v| v.as_str().map(str::to_string))
                            .collect::<Option<Vec<_>>>()
                    })
                    .ok_or_else(|| {
                        ApiError::validation("execCommandAndArgs.args must be a list of strings")
                    })?;
                argv.extend(args);
            }
            Some(argv)
        }
        Some(_) => {
            return Err(ApiError::validation(
                "execCommandAndArgs must be a list of strings or {command, args}",
            ))
        }
    };
    match argv {
        Some(a) if a.is_empty() => Err(ApiError::validation("execCommandAndArgs is empty")),
        Some(a) => Ok(Some(ShellRequest {
            command: None,
            argv: Some(a),
            stdin,
            timeout_ms: timeout,
            max_output: None,
        })),
        None => Ok(None),
    }
}

async fn execute_v2(ctx: &Ctx, body: Body) -> Result<Response, ApiError> {
    let body = read_json(body).await?;
    let body = match body.get("properties") {
        Some(p @ Value::Object(_)) => p.clone(),
        _ => body,
    };
    check_enum(&body, "codeInputType", "inline")?;
    check_enum(&body, "executionType", "synchronous")?;
    let timeout = timeout_ms(&body)?;
    let max_len = match body.get("outputStreamsMaxLength") {
        None | Some(Value::Null) => {
            (ctx.version.name == "2025-10-02-preview").then_some(DEFAULT_STREAM_MAX_2025_10)
        }
        Some(v) => Some(v.as_u64().filter(|n| *n > 0).ok_or_else(|| {
            ApiError::validation("outputStreamsMaxLength must be a positive integer")
        })? as usize),
    };
    let code = opt_str(&body, "code")?;
    let container = ctx.pool.spec().container_type;
    let shell = match shell_request(&body, timeout)? {
        Some(s) => Some(s),
        // On a Shell pool, `code` is a shell command.
        None if container == ContainerType::Shell => code.map(|c| ShellRequest {
            command: Some(c.to_string()),
            argv: None,
            stdin: None,
            timeout_ms: timeout,
            max_output: None,
        }),
        None => None,
    };
    if shell.is_none() && code.is_none() {
        return Err(ApiError::validation(match container {
            ContainerType::PythonLTS => "the body needs 'code' (Python) or 'shellCommand'",
            ContainerType::Shell => "the body needs 'shellCommand' or 'execCommandAndArgs'",
        }));
    }
    let (session, client, _guard) = ctx.session().await?;
    let id = uuid::Uuid::new_v4().to_string();
    let (status, result) = if let Some(req) = shell {
        let r = run_shell(ctx, &session, &client, req.clone()).await?;
        let status = match (r.status, r.exit_code) {
            (ExecStatus::Success | ExecStatus::Failure, Some(code)) => code.to_string(),
            _ => "Failed".to_string(),
        };
        let stderr = explain(&r.stderr, r.status, false, timeout);
        (
            status,
            json!({
                "stdout": truncate_chars(r.stdout, max_len),
                "stderr": truncate_chars(stderr, max_len),
                "executionResult": "",
                "exitCode": r.exit_code,
                "executionTimeInMilliseconds": ms(r.duration_ms),
            }),
        )
    } else {
        let code = code.unwrap_or_default();
        let r = run_python(ctx, &session, &client, code, timeout).await?;
        let stderr = explain(&r.stderr, r.status, r.restarted, timeout);
        let status = if r.status == ExecStatus::Success {
            "Succeeded"
        } else {
            "Failed"
        };
        let mut result = json!({
            "stdout": truncate_chars(r.stdout, max_len),
            "stderr": truncate_chars(stderr, max_len),
            "executionResult": r.result,
            "executionTimeInMilliseconds": ms(r.duration_ms),
        });
        if !r.display.is_empty() {
            result["display"] = Value::Array(r.display);
        }
        (status.to_string(), result)
    };
    let out = json!({
        "id": id,
        "identifier": ctx.identifier,
        "executionType": "Synchronous",
        "status": status,
        "result": result,
    });
    session.record_execution(&id, out.clone());
    Ok(axum::Json(out).into_response())
}

fn get_execution(ctx: &Ctx, id: &str) -> Result<Response, ApiError> {
    let session = ctx.existing()?;
    let _guard = session.begin_call();
    session
        .execution(id)
        .map(|v| {
            (
                [(
                    header::CONTENT_TYPE,
                    header::HeaderValue::from_static("application/json"),
                )],
                v,
            )
                .into_response()
        })
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "ExecutionNotFound",
                format!(
                    "no execution {id:?} in this session (the last {} are kept, up to {} MiB in all)",
                    crate::session::MAX_EXECUTIONS_KEPT,
                    crate::session::MAX_EXECUTION_BYTES_KEPT >> 20
                ),
            )
        })
}

fn entry_v1(e: &FileEntry, id: usize) -> Value {
    json!({
        "$id": (id).to_string(),
        "properties": {
            "$id": (id + 1).to_string(),
            "filename": e.name,
            "size": e.size,
            "lastModifiedTime": e.last_modified,
        }
    })
}

fn entry_v2(e: &FileEntry) -> Value {
    json!({
        "name": e.name,
        "type": "File",
        "sizeInBytes": e.size,
        "lastModifiedAt": e.last_modified,
        "properties": {
            "filename": e.name,
            "size": e.size,
            "lastModifiedTime": e.last_modified,
        }
    })
}

fn file_list(generation: Generation, entries: &[FileEntry]) -> Value {
    match generation {
        Generation::One => json!({
            "$id": "1",
            "value": entries.iter().enumerate().map(|(i, e)| entry_v1(e, 2 + 2 * i)).collect::<Vec<_>>(),
        }),
        Generation::Two => json!({
            "value": entries.iter().map(entry_v2).collect::<Vec<_>>(),
        }),
    }
}

/// The `path` query parameter of generation 2, relative to the data dir.
fn subdir(ctx: &Ctx) -> Result<Option<String>, ApiError> {
    let p = ctx.query.text("path").map_err(ApiError::validation)?;
    Ok(p.map(|p| {
        p.trim_start_matches(sessiond_agent::proto::DATA_DIR)
            .trim_matches('/')
            .to_string()
    })
    .filter(|p| !p.is_empty()))
}

async fn upload_files(ctx: &Ctx, headers: &HeaderMap, body: Body) -> Result<Response, ApiError> {
    let mut multipart = upload::open(headers, body)?;
    let dir = subdir(ctx)?;
    let (session, client, _guard) = ctx.session().await?;
    let mut stored = Vec::new();
    while let Some(field) = upload::next_file(&mut multipart).await? {
        let name = upload::target_name(field.file_name().unwrap_or_default(), dir.as_deref())?;
        tracing::info!(file = %name, "upload");
        let entry = upload::stream_to_agent(field, &client, &name)
            .await
            .map_err(|e| match e {
                upload::UploadFailure::Api(a) => a,
                upload::UploadFailure::Agent(a) => ctx.agent_error(&session, a),
            })?;
        stored.push(entry);
    }
    if stored.is_empty() {
        return Err(ApiError::validation(
            "no file in the multipart body: send the file in a form field named 'file' with a filename",
        ));
    }
    // Generation 2 answers one upload with the file's own metadata
    // (clients read `name` and `sizeInBytes` at the top level).
    let body = match (ctx.version.generation, stored.as_slice()) {
        (Generation::Two, [one]) => entry_v2(one),
        (generation, all) => file_list(generation, all),
    };
    Ok(axum::Json(body).into_response())
}

async fn list_files(ctx: &Ctx) -> Result<Response, ApiError> {
    let dir = subdir(ctx)?;
    let (session, client, _guard) = ctx.session().await?;
    let mut entries = client
        .list_files()
        .await
        .map_err(|e| ctx.agent_error(&session, e))?;
    if let Some(d) = dir {
        let prefix = format!("{d}/");
        entries.retain(|e| e.name.starts_with(&prefix));
    }
    Ok(axum::Json(file_list(ctx.version.generation, &entries)).into_response())
}

async fn file_meta(ctx: &Ctx, name: &str) -> Result<Response, ApiError> {
    let (session, client, _guard) = ctx.session().await?;
    let e = client
        .stat(name)
        .await
        .map_err(|e| ctx.agent_error(&session, e))?;
    Ok(match ctx.version.generation {
        Generation::One => axum::Json(entry_v1(&e, 1)),
        Generation::Two => axum::Json(entry_v2(&e)),
    }
    .into_response())
}

async fn download(ctx: &Ctx, name: &str) -> Result<Response, ApiError> {
    let (session, client, guard) = ctx.session().await?;
    let download = client
        .download(name)
        .await
        .map_err(|e| ctx.agent_error(&session, e))?;
    // The guard rides along with the body: the session does not expire
    // while a large download is still streaming. An agent that stalls
    // mid-stream loses its session like any unresponsive agent.
    let pool = Arc::clone(&ctx.pool);
    let identifier = ctx.identifier.clone();
    let stream = download.body.map(move |chunk| {
        let _keep = &guard;
        chunk.map_err(|e| {
            let api = agent_error(&pool, &identifier, &session, e);
            std::io::Error::other(api.message)
        })
    });
    let mut out = Response::new(Body::from_stream(stream));
    out.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/octet-stream"),
    );
    if let Some(len) = download.content_length {
        out.headers_mut().insert(header::CONTENT_LENGTH, len);
    }
    Ok(out)
}

async fn delete_file(ctx: &Ctx, name: &str) -> Result<Response, ApiError> {
    let (session, client, _guard) = ctx.session().await?;
    client
        .delete(name)
        .await
        .map_err(|e| ctx.agent_error(&session, e))?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

fn get_session(ctx: &Ctx) -> Result<Response, ApiError> {
    let session = ctx.existing()?;
    session.touch();
    let spec = ctx.pool.spec();
    Ok(axum::Json(session.metadata(spec.cooldown)).into_response())
}

fn delete_session(ctx: &Ctx) -> Result<Response, ApiError> {
    let session = ctx.existing()?;
    ctx.pool.remove_session(&session, "deleted by the caller");
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(method: Method, path: &str, g: Generation) -> Result<Op, String> {
        let rest: Vec<String> = path
            .split('/')
            .filter(|s| !s.is_empty())
            .map(String::from)
            .collect();
        route(&method, &rest, g)
    }

    #[test]
    fn pool_paths() {
        assert_eq!(
            split_pool_path("/pools/py/code/execute"),
            Some(("py", vec!["code", "execute"]))
        );
        assert_eq!(
            split_pool_path("/subscriptions/s/resourceGroups/rg/sessionPools/py/executions"),
            Some(("py", vec!["executions"]))
        );
        assert_eq!(
            split_pool_path(
                "/subscriptions/s/resourceGroups/rg/providers/Microsoft.App/sessionPools/py/files"
            ),
            Some(("py", vec!["files"]))
        );
        assert_eq!(split_pool_path("/nothing/here"), None);
    }

    #[test]
    fn routes_of_both_generations() {
        use Generation::*;
        assert_eq!(r(Method::POST, "code/execute", One), Ok(Op::ExecuteV1));
        assert_eq!(r(Method::POST, "executions", Two), Ok(Op::ExecuteV2));
        assert_eq!(
            r(Method::GET, "files/content/a/b.txt", One),
            Ok(Op::Download("a/b.txt".into()))
        );
        assert_eq!(
            r(Method::GET, "files/a/b.txt/content", Two),
            Ok(Op::Download("a/b.txt".into()))
        );
        assert_eq!(
            r(Method::GET, "files/a.txt", Two),
            Ok(Op::FileMeta("a.txt".into()))
        );
        assert_eq!(r(Method::POST, "files", Two), Ok(Op::Upload));
        assert_eq!(r(Method::POST, "files/upload", One), Ok(Op::Upload));
        assert_eq!(r(Method::DELETE, "session", Two), Ok(Op::DeleteSession));
        assert!(r(Method::GET, "code/execute", One)
            .unwrap_err()
            .contains("method GET"));
        assert!(r(Method::GET, "nope", One)
            .unwrap_err()
            .contains("unknown path /nope"));
    }

    #[test]
    fn timeouts_are_capped() {
        assert_eq!(
            timeout_ms(&json!({"timeoutInSeconds": 5})).unwrap(),
            Some(5000)
        );
        assert_eq!(
            timeout_ms(&json!({"timeoutInSeconds": 1000})).unwrap(),
            Some(220_000)
        );
        assert!(timeout_ms(&json!({"timeoutInSeconds": -1})).is_err());
        assert!(timeout_ms(&json!({"timeoutInSeconds": "x"})).is_err());
    }

    #[test]
    fn timeout_is_explained_in_stderr() {
        let s = explain(
            "Traceback\nKeyboardInterrupt",
            ExecStatus::Timeout,
            false,
            Some(2000),
        );
        assert!(s.contains("timed out after 2 seconds"), "{s}");
        assert_eq!(explain("x", ExecStatus::Failure, false, None), "x");
    }

    #[test]
    fn gen1_file_list_shape() {
        let e = FileEntry {
            name: "a.csv".into(),
            size: 5,
            last_modified: "2024-05-02T07:21:07.992261Z".into(),
        };
        let v = file_list(Generation::One, &[e.clone(), e]);
        assert_eq!(v["$id"], "1");
        assert_eq!(v["value"][0]["$id"], "2");
        assert_eq!(v["value"][0]["properties"]["$id"], "3");
        assert_eq!(v["value"][1]["$id"], "4");
        assert_eq!(v["value"][1]["properties"]["filename"], "a.csv");
        assert_eq!(v["value"][1]["properties"]["size"], 5);
    }

    #[test]
    fn shell_bodies() {
        let s = shell_request(&json!({"shellCommand": "ls"}), None)
            .unwrap()
            .unwrap();
        assert_eq!(s.command.as_deref(), Some("ls"));
        let s = shell_request(
            &json!({"execCommandAndArgs": ["echo", "hi"], "stdin": "x"}),
            None,
        )
        .unwrap()
        .unwrap();
        assert_eq!(s.argv.unwrap(), vec!["echo", "hi"]);
        assert_eq!(s.stdin.as_deref(), Some("x"));
        let s = shell_request(
            &json!({"execCommandAndArgs": {"command": "echo", "args": ["a"]}}),
            None,
        )
        .unwrap()
        .unwrap();
        assert_eq!(s.argv.unwrap(), vec!["echo", "a"]);
        assert!(shell_request(&json!({"code": "1"}), None)
            .unwrap()
            .is_none());
        assert!(shell_request(&json!({"execCommandAndArgs": []}), None).is_err());
    }

    #[test]
    fn streams_truncate_by_characters() {
        assert_eq!(truncate_chars("héllo".into(), Some(2)), "hé");
        assert_eq!(truncate_chars("hi".into(), None), "hi");
    }
}
