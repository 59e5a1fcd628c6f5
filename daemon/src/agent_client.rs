//! Typed HTTP/1.1 client for the in-sandbox agent (routes in
//! `sessiond_agent::proto`). One connection per request: connecting a Unix
//! socket costs microseconds, and it keeps a dead agent from poisoning a pool
//! of connections.

use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::Body;
use bytes::Bytes;
use futures_util::stream::BoxStream;
use futures_util::{Stream, StreamExt};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::header::HeaderValue;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use serde::Serialize;
use sessiond_agent::proto::{
    AgentError, FileEntry, Health, InitRequest, PythonRequest, PythonResponse, ShellRequest,
    ShellResponse, DEFAULT_TIMEOUT_MS,
};
use tokio::net::UnixStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;

/// Largest JSON answer read from the agent. The daemon asks for the default
/// 1 MiB cap per output stream; stdout, stderr and a string result at 1 MiB
/// each stay under 18 MiB even if every byte is JSON-escaped as `\u00XX`,
/// and the runner keeps figures under 8 MiB of PNG (under 11 MiB as base64).
pub const MAX_JSON_BYTES: usize = 32 << 20;

/// Agent calls one session may have in flight; further calls wait for a
/// slot, so a caller cannot make the agent hold unbounded connections.
pub const MAX_CONCURRENT_CALLS: usize = 4;

/// Longest an error message from the agent may be once sanitized.
const MAX_AGENT_MESSAGE: usize = 4096;
/// Longest error code from the agent passed on; codes are ASCII letters.
const MAX_AGENT_CODE: usize = 64;
/// Agent statuses passed through to the caller: the agent's verdicts on the
/// request itself. Anything else is the sandbox's failure (502).
const PASSED_STATUSES: [StatusCode; 5] = [
    StatusCode::BAD_REQUEST,
    StatusCode::NOT_FOUND,
    StatusCode::CONFLICT,
    StatusCode::PAYLOAD_TOO_LARGE,
    StatusCode::INSUFFICIENT_STORAGE,
];

/// How long the agent may take over each kind of call. A stopped or
/// hijacked agent accepts connections and never answers; without these a
/// call (and the pool slot of its session) would hang forever.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deadlines {
    /// Health, init and stat: answered from memory or one syscall.
    pub call: Duration,
    /// Listing and deleting files: they walk the data directory.
    pub tree: Duration,
    /// Added to an execution's own timeout: the agent interrupts for up to
    /// 2 s, kills the process group for up to 5 s, then restarts Python.
    pub exec_grace: Duration,
    /// Longest stall of a streamed upload or download while the agent, not
    /// the caller, is the side that should make progress.
    pub idle: Duration,
}

impl Default for Deadlines {
    fn default() -> Self {
        Deadlines {
            call: Duration::from_secs(10),
            tree: Duration::from_secs(30),
            exec_grace: Duration::from_secs(20),
            idle: Duration::from_secs(30),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AgentCallError {
    #[error("cannot connect to the sandbox agent")]
    Connect(#[source] std::io::Error),
    #[error("connection to the sandbox agent failed")]
    Transport(#[source] hyper::Error),
    /// The agent took longer than its deadline: it is stopped, hung or
    /// hostile, and the session cannot be trusted to answer again.
    #[error("the sandbox agent did not answer {what} within {} s", after.as_secs_f64())]
    Unresponsive { what: &'static str, after: Duration },
    /// A refusal of the request itself; `status` is one of the statuses
    /// passed through, `code` and `message` are sanitized.
    #[error("{code}: {message}")]
    Agent {
        status: StatusCode,
        code: String,
        message: String,
    },
    /// The agent failed with a status that is not passed through.
    #[error("the sandbox agent failed with status {status}: {code}: {message}")]
    Failed {
        status: StatusCode,
        code: String,
        message: String,
    },
    #[error("unexpected answer from the sandbox agent: {0}")]
    Decode(String),
}

impl AgentCallError {
    /// Whether the failure says nothing about the request but something
    /// about the sandbox (gone, crashed, hung up).
    pub fn is_transport(&self) -> bool {
        matches!(
            self,
            AgentCallError::Connect(_) | AgentCallError::Transport(_)
        )
    }
}

/// Keeps only what is safe in a header, a log line and a JSON message:
/// printable text without control or bidirectional-override characters,
/// cut to `max` bytes on a character boundary.
pub fn sanitize_message(raw: &str, max: usize) -> String {
    let mut out = String::with_capacity(raw.len().min(max));
    for c in raw.chars() {
        let c = if c.is_control() || matches!(c, '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}')
        {
            ' '
        } else {
            c
        };
        if out.len() + c.len_utf8() > max {
            break;
        }
        out.push(c);
    }
    out
}

/// An agent error code if it is 1 to 64 ASCII letters, else `fallback`.
pub fn sanitize_code(raw: &str, fallback: &str) -> String {
    if !raw.is_empty()
        && raw.len() <= MAX_AGENT_CODE
        && raw.bytes().all(|b| b.is_ascii_alphabetic())
    {
        raw.to_string()
    } else {
        fallback.to_string()
    }
}

/// Aborts the connection task when the call is dropped, so a call given up
/// on a deadline does not leave a task waiting on a stopped agent.
struct ConnTask(JoinHandle<()>);

impl Drop for ConnTask {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[derive(Debug, Clone)]
pub struct AgentClient {
    socket: PathBuf,
    deadlines: Deadlines,
    /// Shared by the clones handed to each request of one session.
    permits: Arc<Semaphore>,
}

/// A download in progress: the length the agent announced and its bytes.
/// The stream fails with [`AgentCallError::Unresponsive`] when the agent
/// stalls for the idle deadline while the caller is waiting for bytes.
pub struct Download {
    pub content_length: Option<HeaderValue>,
    pub body: BoxStream<'static, Result<Bytes, AgentCallError>>,
}

/// Percent-encodes each `/`-separated segment of a data-dir relative path.
pub fn encode_path(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    for (i, seg) in path.split('/').enumerate() {
        if i > 0 {
            out.push('/');
        }
        for b in seg.bytes() {
            if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
                out.push(b as char);
            } else {
                out.push_str(&format!("%{b:02X}"));
            }
        }
    }
    out
}

/// When the upload last moved, and whether it is the caller (not the
/// agent) who is being waited for.
#[derive(Default)]
struct Progress {
    last: Mutex<Option<Instant>>,
    waiting_on_caller: AtomicBool,
}

impl Progress {
    fn mark(&self) {
        *self.last.lock().expect("progress lock") = Some(Instant::now());
    }

    fn agent_stalled_for(&self) -> Duration {
        if self.waiting_on_caller.load(Ordering::SeqCst) {
            return Duration::ZERO;
        }
        self.last
            .lock()
            .expect("progress lock")
            .map_or(Duration::ZERO, |t| t.elapsed())
    }
}

/// The upload body as sent to the agent, recording progress on every poll.
struct Tracked {
    inner: BoxStream<'static, Result<Bytes, std::io::Error>>,
    progress: Arc<Progress>,
}

impl Stream for Tracked {
    type Item = Result<Bytes, std::io::Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        // Being polled means the agent took the previous chunk.
        self.progress.mark();
        let r = self.inner.poll_next_unpin(cx);
        self.progress
            .waiting_on_caller
            .store(r.is_pending(), Ordering::SeqCst);
        if r.is_ready() {
            self.progress.mark();
        }
        r
    }
}

impl AgentClient {
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        Self::with_deadlines(socket, Deadlines::default())
    }

    pub fn with_deadlines(socket: impl Into<PathBuf>, deadlines: Deadlines) -> Self {
        AgentClient {
            socket: socket.into(),
            deadlines,
            permits: Arc::new(Semaphore::new(MAX_CONCURRENT_CALLS)),
        }
    }

    /// Waits for one of the session's call slots (not under any deadline:
    /// the calls holding the slots are).
    async fn permit(&self) -> OwnedSemaphorePermit {
        Arc::clone(&self.permits)
            .acquire_owned()
            .await
            .expect("the call semaphore is never closed")
    }

    /// Sends one request on a fresh connection; the response body streams
    /// while the returned task guard lives.
    async fn send(
        &self,
        req: Request<Body>,
    ) -> Result<(Response<Incoming>, ConnTask), AgentCallError> {
        let stream = UnixStream::connect(&self.socket)
            .await
            .map_err(AgentCallError::Connect)?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(AgentCallError::Transport)?;
        let task = ConnTask(tokio::spawn(async move {
            // The connection ends with the response body; errors surface there.
            let _ = conn.await;
        }));
        let resp = sender
            .send_request(req)
            .await
            .map_err(AgentCallError::Transport)?;
        Ok((resp, task))
    }

    fn request(method: Method, uri: &str, body: Body) -> Request<Body> {
        let mut req = Request::new(body);
        *req.method_mut() = method;
        *req.uri_mut() = uri
            .parse()
            .expect("agent URIs are built from encoded paths");
        req.headers_mut()
            .insert(hyper::header::HOST, "agent".parse().expect("static header"));
        req
    }

    async fn read_body(resp: Response<Incoming>) -> Result<(StatusCode, Bytes), AgentCallError> {
        let status = resp.status();
        let body = http_body_util::Limited::new(resp.into_body(), MAX_JSON_BYTES)
            .collect()
            .await
            .map_err(|e| match e.downcast::<hyper::Error>() {
                Ok(h) => AgentCallError::Transport(*h),
                Err(e) => AgentCallError::Decode(e.to_string()),
            })?
            .to_bytes();
        Ok((status, body))
    }

    /// Turns a non-2xx answer into [`AgentCallError::Agent`] (statuses that
    /// judge the request) or [`AgentCallError::Failed`] (anything else),
    /// with code and message made safe to show.
    fn check(status: StatusCode, body: &[u8]) -> Result<(), AgentCallError> {
        if status.is_success() {
            return Ok(());
        }
        let (code, message) = match serde_json::from_slice::<AgentError>(body) {
            Ok(e) => (
                sanitize_code(&e.code, "SessionAgentError"),
                sanitize_message(&e.message, MAX_AGENT_MESSAGE),
            ),
            Err(_) => (
                "SessionAgentError".to_string(),
                sanitize_message(
                    &String::from_utf8_lossy(&body[..body.len().min(MAX_AGENT_MESSAGE)]),
                    MAX_AGENT_MESSAGE,
                ),
            ),
        };
        if PASSED_STATUSES.contains(&status) {
            Err(AgentCallError::Agent {
                status,
                code,
                message,
            })
        } else {
            Err(AgentCallError::Failed {
                status,
                code,
                message,
            })
        }
    }

    /// Runs `fut` (connect to last body byte) under `deadline`.
    async fn within<T>(
        what: &'static str,
        deadline: Duration,
        fut: impl std::future::Future<Output = Result<T, AgentCallError>>,
    ) -> Result<T, AgentCallError> {
        tokio::time::timeout(deadline, fut)
            .await
            .map_err(|_| AgentCallError::Unresponsive {
                what,
                after: deadline,
            })?
    }

    async fn call_json<T: DeserializeOwned>(
        &self,
        what: &'static str,
        deadline: Duration,
        method: Method,
        uri: &str,
        body: Option<&impl Serialize>,
    ) -> Result<T, AgentCallError> {
        let body = match body {
            Some(b) => Body::from(
                serde_json::to_vec(b).map_err(|e| AgentCallError::Decode(e.to_string()))?,
            ),
            None => Body::empty(),
        };
        let mut req = Self::request(method, uri, body);
        req.headers_mut().insert(
            hyper::header::CONTENT_TYPE,
            "application/json".parse().expect("static header"),
        );
        let _permit = self.permit().await;
        Self::within(what, deadline, async {
            let (resp, _conn) = self.send(req).await?;
            let (status, bytes) = Self::read_body(resp).await?;
            Self::check(status, &bytes)?;
            serde_json::from_slice(&bytes).map_err(|e| AgentCallError::Decode(e.to_string()))
        })
        .await
    }

    /// The deadline of an execution with the given timeout.
    pub fn exec_deadline(&self, timeout_ms: Option<u64>) -> Duration {
        Duration::from_millis(timeout_ms.unwrap_or(DEFAULT_TIMEOUT_MS)) + self.deadlines.exec_grace
    }

    pub async fn health(&self) -> Result<Health, AgentCallError> {
        self.call_json(
            "health",
            self.deadlines.call,
            Method::GET,
            "/health",
            None::<&()>,
        )
        .await
    }

    pub async fn init(&self, req: &InitRequest) -> Result<Health, AgentCallError> {
        self.call_json(
            "init",
            self.deadlines.call,
            Method::POST,
            "/init",
            Some(req),
        )
        .await
    }

    pub async fn python(&self, req: &PythonRequest) -> Result<PythonResponse, AgentCallError> {
        let deadline = self.exec_deadline(req.timeout_ms);
        self.call_json(
            "a Python execution",
            deadline,
            Method::POST,
            "/execute/python",
            Some(req),
        )
        .await
    }

    pub async fn shell(&self, req: &ShellRequest) -> Result<ShellResponse, AgentCallError> {
        let deadline = self.exec_deadline(req.timeout_ms);
        self.call_json(
            "a shell execution",
            deadline,
            Method::POST,
            "/execute/shell",
            Some(req),
        )
        .await
    }

    pub async fn list_files(&self) -> Result<Vec<FileEntry>, AgentCallError> {
        self.call_json(
            "the file list",
            self.deadlines.tree,
            Method::GET,
            "/files",
            None::<&()>,
        )
        .await
    }

    pub async fn stat(&self, path: &str) -> Result<FileEntry, AgentCallError> {
        let uri = format!("/stat/{}", encode_path(path));
        self.call_json(
            "a file lookup",
            self.deadlines.call,
            Method::GET,
            &uri,
            None::<&()>,
        )
        .await
    }

    /// Starts a download: the answer's head is due within the call
    /// deadline, then each chunk within the idle deadline of being asked for.
    pub async fn download(&self, path: &str) -> Result<Download, AgentCallError> {
        let uri = format!("/files/{}", encode_path(path));
        let permit = self.permit().await;
        let (resp, conn) = Self::within("a download", self.deadlines.call, async {
            let (resp, conn) = self
                .send(Self::request(Method::GET, &uri, Body::empty()))
                .await?;
            if resp.status().is_success() {
                return Ok((resp, conn));
            }
            let (status, bytes) = Self::read_body(resp).await?;
            Self::check(status, &bytes)?;
            Err(AgentCallError::Decode(format!("status {status}")))
        })
        .await?;
        let content_length = resp.headers().get(hyper::header::CONTENT_LENGTH).cloned();
        let idle = self.deadlines.idle;
        let state = Some((resp.into_body(), permit, conn));
        let body = futures_util::stream::unfold(state, move |state| async move {
            let (mut body, permit, conn) = state?;
            loop {
                match tokio::time::timeout(idle, body.frame()).await {
                    Err(_) => {
                        let e = AgentCallError::Unresponsive {
                            what: "a download",
                            after: idle,
                        };
                        return Some((Err(e), None));
                    }
                    Ok(None) => return None,
                    Ok(Some(Err(e))) => return Some((Err(AgentCallError::Transport(e)), None)),
                    Ok(Some(Ok(frame))) => match frame.into_data() {
                        Ok(data) if !data.is_empty() => {
                            return Some((Ok(data), Some((body, permit, conn))))
                        }
                        _ => continue,
                    },
                }
            }
        })
        .boxed();
        Ok(Download {
            content_length,
            body,
        })
    }

    /// Streams `body` into the file at `path` (replacing it). The agent
    /// fails the idle deadline when it neither takes the next chunk nor
    /// answers while the upload is not waiting on the caller's bytes.
    pub async fn upload(
        &self,
        path: &str,
        body: impl Stream<Item = Result<Bytes, std::io::Error>> + Send + 'static,
    ) -> Result<FileEntry, AgentCallError> {
        let uri = format!("/files/{}", encode_path(path));
        let progress = Arc::new(Progress::default());
        let tracked = Tracked {
            inner: body.boxed(),
            progress: Arc::clone(&progress),
        };
        let mut req = Self::request(Method::PUT, &uri, Body::from_stream(tracked));
        req.headers_mut().insert(
            hyper::header::CONTENT_TYPE,
            "application/octet-stream".parse().expect("static header"),
        );
        let _permit = self.permit().await;
        progress.mark();
        let call = async {
            let (resp, _conn) = self.send(req).await?;
            let (status, bytes) = Self::read_body(resp).await?;
            Self::check(status, &bytes)?;
            serde_json::from_slice(&bytes).map_err(|e| AgentCallError::Decode(e.to_string()))
        };
        tokio::pin!(call);
        let idle = self.deadlines.idle;
        let mut tick = tokio::time::interval((idle / 4).min(Duration::from_secs(1)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                r = &mut call => return r,
                _ = tick.tick() => {
                    if progress.agent_stalled_for() >= idle {
                        return Err(AgentCallError::Unresponsive { what: "an upload", after: idle });
                    }
                }
            }
        }
    }

    pub async fn delete(&self, path: &str) -> Result<(), AgentCallError> {
        let uri = format!("/files/{}", encode_path(path));
        let _permit = self.permit().await;
        Self::within("a file deletion", self.deadlines.tree, async {
            let (resp, _conn) = self
                .send(Self::request(Method::DELETE, &uri, Body::empty()))
                .await?;
            let (status, bytes) = Self::read_body(resp).await?;
            Self::check(status, &bytes)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_encoded_per_segment() {
        assert_eq!(encode_path("a/b c.txt"), "a/b%20c.txt");
        assert_eq!(encode_path("100%/x?y#z"), "100%25/x%3Fy%23z");
        assert_eq!(encode_path("plain.csv"), "plain.csv");
    }

    use std::sync::atomic::AtomicUsize;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::UnixListener;

    impl AgentCallError {
        fn is_unresponsive(&self) -> bool {
            matches!(self, AgentCallError::Unresponsive { .. })
        }
    }

    struct SocketDir(PathBuf);

    impl Drop for SocketDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn short() -> Deadlines {
        Deadlines {
            call: Duration::from_millis(300),
            tree: Duration::from_millis(300),
            exec_grace: Duration::from_millis(300),
            idle: Duration::from_millis(400),
        }
    }

    /// A socket whose "agent" runs `serve` on every connection it accepts.
    fn fake_agent<F, Fut>(serve: F) -> (SocketDir, PathBuf)
    where
        F: Fn(tokio::net::UnixStream) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let dir = SocketDir(std::env::temp_dir().join(format!(
            "sessiond-agent-client-{}",
            uuid::Uuid::new_v4().simple()
        )));
        std::fs::create_dir(&dir.0).unwrap();
        let path = dir.0.join("agent.sock");
        let listener = UnixListener::bind(&path).unwrap();
        tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                tokio::spawn(serve(s));
            }
        });
        (dir, path)
    }

    /// Reads a request head, then answers `status` with `body`.
    async fn answer(mut s: tokio::net::UnixStream, status: u16, body: String) {
        let mut buf = vec![0u8; 8192];
        let mut got = Vec::new();
        while !got.windows(4).any(|w| w == b"\r\n\r\n") {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
        let head = format!(
            "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
            body.len()
        );
        let _ = s.write_all(head.as_bytes()).await;
        let _ = s.write_all(body.as_bytes()).await;
        tokio::time::sleep(Duration::from_secs(60)).await;
    }

    #[tokio::test]
    async fn a_silent_agent_fails_the_deadline() {
        // Accepts and never answers, like an agent stopped with SIGSTOP
        // (the kernel still completes connections to its listening socket).
        let (_d, path) = fake_agent(|s| async move {
            tokio::time::sleep(Duration::from_secs(60)).await;
            drop(s);
        });
        let c = AgentClient::with_deadlines(&path, short());
        let t = Instant::now();
        let e = c.health().await.unwrap_err();
        assert!(e.is_unresponsive(), "{e}");
        assert!(t.elapsed() < Duration::from_secs(2));
        let t = Instant::now();
        let e = c
            .shell(&ShellRequest {
                command: Some("true".into()),
                argv: None,
                stdin: None,
                timeout_ms: Some(200),
                max_output: None,
            })
            .await
            .unwrap_err();
        assert!(e.is_unresponsive(), "{e}");
        // The execution's own timeout plus the grace, not the call deadline.
        assert!(t.elapsed() >= Duration::from_millis(500));
        assert!(t.elapsed() < Duration::from_secs(2));
    }

    #[tokio::test]
    async fn agent_statuses_and_codes_are_filtered() {
        let (_d, path) = fake_agent(|s| async move {
            answer(
                s,
                500,
                r#"{"code":"Internal","message":"disk\nbroke"}"#.into(),
            )
            .await
        });
        let e = AgentClient::with_deadlines(&path, short())
            .stat("a")
            .await
            .unwrap_err();
        match e {
            AgentCallError::Failed {
                status, message, ..
            } => {
                assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
                assert_eq!(message, "disk broke");
            }
            other => panic!("expected Failed, got {other:?}"),
        }
        let long_code = "A".repeat(65);
        let msg = "x\\u202e".repeat(5000);
        let (_d2, path) = fake_agent(move |s| {
            let body = format!(r#"{{"code":"{long_code}","message":"{msg}"}}"#);
            async move { answer(s, 404, body).await }
        });
        match AgentClient::with_deadlines(&path, short())
            .stat("a")
            .await
            .unwrap_err()
        {
            AgentCallError::Agent {
                status,
                code,
                message,
            } => {
                assert_eq!(status, StatusCode::NOT_FOUND);
                assert_eq!(code, "SessionAgentError");
                assert!(message.len() <= MAX_AGENT_MESSAGE);
                assert!(!message.contains('\u{202e}'));
            }
            other => panic!("expected Agent, got {other:?}"),
        }
    }

    #[test]
    fn codes_and_messages_are_sanitized() {
        assert_eq!(sanitize_code("FileNotFound", "G"), "FileNotFound");
        assert_eq!(sanitize_code("Bad\r\nSet-Cookie: x", "G"), "G");
        assert_eq!(sanitize_code("", "G"), "G");
        assert_eq!(sanitize_code(&"a".repeat(64), "G").len(), 64);
        assert_eq!(sanitize_message("a\r\nb\u{1b}[31m", 100), "a  b [31m");
        assert_eq!(sanitize_message("héllo", 2), "h");
    }

    #[tokio::test]
    async fn calls_per_session_are_bounded_and_queue() {
        let active = Arc::new(AtomicUsize::new(0));
        let peak = Arc::new(AtomicUsize::new(0));
        let (a, p) = (Arc::clone(&active), Arc::clone(&peak));
        let (_d, path) = fake_agent(move |s| {
            let (a, p) = (Arc::clone(&a), Arc::clone(&p));
            async move {
                let now = a.fetch_add(1, Ordering::SeqCst) + 1;
                p.fetch_max(now, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(100)).await;
                a.fetch_sub(1, Ordering::SeqCst);
                answer(
                    s,
                    200,
                    r#"{"status":"ok","python_ready":true,"version":"t"}"#.into(),
                )
                .await
            }
        });
        let c = AgentClient::new(&path);
        let calls = (0..10).map(|_| {
            let c = c.clone();
            async move { c.health().await }
        });
        for r in futures_util::future::join_all(calls).await {
            r.unwrap();
        }
        assert_eq!(peak.load(Ordering::SeqCst), MAX_CONCURRENT_CALLS);
    }

    #[tokio::test]
    async fn a_stalled_download_fails_the_idle_deadline() {
        let (_d, path) = fake_agent(|mut s| async move {
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf).await;
            let _ = s
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n0123456789")
                .await;
            tokio::time::sleep(Duration::from_secs(60)).await;
        });
        let c = AgentClient::with_deadlines(&path, short());
        let mut d = c.download("f").await.unwrap();
        assert_eq!(d.content_length.unwrap(), "100");
        assert_eq!(d.body.next().await.unwrap().unwrap(), "0123456789");
        let t = Instant::now();
        let e = d.body.next().await.unwrap().unwrap_err();
        assert!(e.is_unresponsive(), "{e}");
        assert!(t.elapsed() < Duration::from_secs(2));
    }

    #[tokio::test]
    async fn uploads_time_out_on_the_agent_not_on_the_caller() {
        // An agent that never reads: the socket buffer fills, then nothing moves.
        let (_d, path) = fake_agent(|s| async move {
            tokio::time::sleep(Duration::from_secs(60)).await;
            drop(s);
        });
        let c = AgentClient::with_deadlines(&path, short());
        let chunks = futures_util::stream::iter(
            std::iter::repeat_n(Bytes::from(vec![0u8; 1 << 20]), 64).map(Ok),
        );
        let t = Instant::now();
        let e = c.upload("f", chunks).await.unwrap_err();
        assert!(e.is_unresponsive(), "{e}");
        assert!(t.elapsed() < Duration::from_secs(3));

        // A caller slower than the idle deadline is not the agent's fault.
        let (_d2, path) = fake_agent(|mut s| async move {
            let mut buf = vec![0u8; 65536];
            let mut got = Vec::new();
            while !got.ends_with(b"0\r\n\r\n") {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                }
            }
            let body = r#"{"name":"f","size":2,"last_modified":"x"}"#;
            let head = format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n", body.len());
            let _ = s.write_all(head.as_bytes()).await;
            let _ = s.write_all(body.as_bytes()).await;
        });
        let c = AgentClient::with_deadlines(&path, short());
        let slow =
            futures_util::stream::iter([Bytes::from("a"), Bytes::from("b")]).then(|b| async {
                tokio::time::sleep(Duration::from_millis(700)).await;
                Ok(b)
            });
        let entry = c.upload("f", slow).await.unwrap();
        assert_eq!(entry.size, 2);
    }

    #[tokio::test]
    async fn missing_socket_is_a_transport_error() {
        let c = AgentClient::new("/nonexistent/sessiond-test.sock");
        let e = c.health().await.unwrap_err();
        assert!(e.is_transport());
    }
}
