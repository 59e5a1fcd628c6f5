//! Typed HTTP/1.1 client for the in-sandbox agent (routes in
//! `sessiond_agent::proto`). One connection per request: connecting a Unix
//! socket costs microseconds, and it keeps a dead agent from poisoning a pool
//! of connections.

use std::path::PathBuf;

use axum::body::Body;
use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use serde::Serialize;
use sessiond_agent::proto::{
    AgentError, FileEntry, Health, InitRequest, PythonRequest, PythonResponse, ShellRequest,
    ShellResponse,
};
use tokio::net::UnixStream;

/// Largest JSON answer read from the agent (outputs are capped well below).
const MAX_JSON_BYTES: usize = 64 << 20;

#[derive(Debug, thiserror::Error)]
pub enum AgentCallError {
    #[error("cannot connect to the sandbox agent")]
    Connect(#[source] std::io::Error),
    #[error("connection to the sandbox agent failed")]
    Transport(#[source] hyper::Error),
    #[error("{code}: {message}")]
    Agent {
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

#[derive(Debug, Clone)]
pub struct AgentClient {
    socket: PathBuf,
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

impl AgentClient {
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        AgentClient {
            socket: socket.into(),
        }
    }

    /// Sends one request on a fresh connection; the response body streams.
    pub async fn send(&self, req: Request<Body>) -> Result<Response<Incoming>, AgentCallError> {
        let stream = UnixStream::connect(&self.socket)
            .await
            .map_err(AgentCallError::Connect)?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(AgentCallError::Transport)?;
        tokio::spawn(async move {
            // The connection ends with the response body; errors surface there.
            let _ = conn.await;
        });
        sender
            .send_request(req)
            .await
            .map_err(AgentCallError::Transport)
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

    /// Turns a non-2xx answer into [`AgentCallError::Agent`].
    fn check(status: StatusCode, body: &[u8]) -> Result<(), AgentCallError> {
        if status.is_success() {
            return Ok(());
        }
        match serde_json::from_slice::<AgentError>(body) {
            Ok(e) => Err(AgentCallError::Agent {
                status,
                code: e.code,
                message: e.message,
            }),
            Err(_) => Err(AgentCallError::Agent {
                status,
                code: "Internal".into(),
                message: String::from_utf8_lossy(body).chars().take(500).collect(),
            }),
        }
    }

    async fn call_json<T: DeserializeOwned>(
        &self,
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
        let (status, bytes) = Self::read_body(self.send(req).await?).await?;
        Self::check(status, &bytes)?;
        serde_json::from_slice(&bytes).map_err(|e| AgentCallError::Decode(e.to_string()))
    }

    pub async fn health(&self) -> Result<Health, AgentCallError> {
        self.call_json(Method::GET, "/health", None::<&()>).await
    }

    pub async fn init(&self, req: &InitRequest) -> Result<Health, AgentCallError> {
        self.call_json(Method::POST, "/init", Some(req)).await
    }

    pub async fn python(&self, req: &PythonRequest) -> Result<PythonResponse, AgentCallError> {
        self.call_json(Method::POST, "/execute/python", Some(req))
            .await
    }

    pub async fn shell(&self, req: &ShellRequest) -> Result<ShellResponse, AgentCallError> {
        self.call_json(Method::POST, "/execute/shell", Some(req))
            .await
    }

    pub async fn list_files(&self) -> Result<Vec<FileEntry>, AgentCallError> {
        self.call_json(Method::GET, "/files", None::<&()>).await
    }

    pub async fn stat(&self, path: &str) -> Result<FileEntry, AgentCallError> {
        let uri = format!("/stat/{}", encode_path(path));
        self.call_json(Method::GET, &uri, None::<&()>).await
    }

    /// Starts a download; the returned response's body streams the bytes.
    pub async fn download(&self, path: &str) -> Result<Response<Incoming>, AgentCallError> {
        let uri = format!("/files/{}", encode_path(path));
        let resp = self
            .send(Self::request(Method::GET, &uri, Body::empty()))
            .await?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        let (status, bytes) = Self::read_body(resp).await?;
        Self::check(status, &bytes)?;
        Err(AgentCallError::Decode(format!("status {status}")))
    }

    /// Streams `body` into the file at `path` (replacing it).
    pub async fn upload(&self, path: &str, body: Body) -> Result<FileEntry, AgentCallError> {
        let uri = format!("/files/{}", encode_path(path));
        let mut req = Self::request(Method::PUT, &uri, body);
        req.headers_mut().insert(
            hyper::header::CONTENT_TYPE,
            "application/octet-stream".parse().expect("static header"),
        );
        let (status, bytes) = Self::read_body(self.send(req).await?).await?;
        Self::check(status, &bytes)?;
        serde_json::from_slice(&bytes).map_err(|e| AgentCallError::Decode(e.to_string()))
    }

    pub async fn delete(&self, path: &str) -> Result<(), AgentCallError> {
        let uri = format!("/files/{}", encode_path(path));
        let resp = self
            .send(Self::request(Method::DELETE, &uri, Body::empty()))
            .await?;
        let (status, bytes) = Self::read_body(resp).await?;
        Self::check(status, &bytes)
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

    #[tokio::test]
    async fn missing_socket_is_a_transport_error() {
        let c = AgentClient::new("/nonexistent/sessiond-test.sock");
        let e = c.health().await.unwrap_err();
        assert!(e.is_transport());
    }
}
