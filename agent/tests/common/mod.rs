//! Runs the real `sessiond-agent` binary on a Unix socket in a temp dir,
//! with the real `python3` from PATH, and talks HTTP/1.1 to it.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use sessiond_agent::proto::{Health, PythonResponse, ShellResponse};

static COUNTER: AtomicUsize = AtomicUsize::new(0);

pub const AGENT: &str = env!("CARGO_BIN_EXE_sessiond-agent");

pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!(
            "sessiond-agent-test-{tag}-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(p.join("data")).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub struct Agent {
    pub child: Child,
    pub dir: TempDir,
    pub sock: PathBuf,
}

pub struct Reply {
    pub status: StatusCode,
    pub headers: hyper::HeaderMap,
    pub body: Vec<u8>,
}

impl Reply {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }
}

impl Agent {
    pub async fn start(tag: &str) -> Agent {
        Agent::start_with(tag, |cmd, _| cmd).await
    }

    /// `wrap` builds the command from the agent's own argv (so a test can
    /// run it under `unshare`, or add `--python`).
    pub async fn start_with(
        tag: &str,
        wrap: impl FnOnce(Vec<String>, &Path) -> Vec<String>,
    ) -> Agent {
        let dir = TempDir::new(tag);
        let sock = dir.0.join("agent.sock");
        let data = dir.0.join("data");
        let argv = wrap(
            vec![
                AGENT.to_string(),
                "--listen".into(),
                sock.display().to_string(),
                "--data-dir".into(),
                data.display().to_string(),
            ],
            &dir.0,
        );
        let child = Command::new(&argv[0])
            .args(&argv[1..])
            .stdin(Stdio::null())
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .spawn()
            .expect("start the agent");
        let agent = Agent { child, dir, sock };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if agent.sock.exists() {
                if let Ok(r) = agent.try_request("GET", "/health", Vec::new()).await {
                    let h: Health = serde_json::from_slice(&r.body).unwrap();
                    if h.python_ready {
                        return agent;
                    }
                }
            }
            assert!(Instant::now() < deadline, "agent did not become ready");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn data(&self) -> PathBuf {
        self.dir.0.join("data")
    }

    async fn try_request(&self, method: &str, path: &str, body: Vec<u8>) -> anyhow::Result<Reply> {
        let stream = tokio::net::UnixStream::connect(&self.sock).await?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(conn);
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "agent")
            .body(Full::new(Bytes::from(body)))?;
        let resp = sender.send_request(req).await?;
        let status = resp.status();
        let headers = resp.headers().clone();
        let body = resp.into_body().collect().await?.to_bytes().to_vec();
        Ok(Reply {
            status,
            headers,
            body,
        })
    }

    pub async fn request(&self, method: &str, path: &str, body: impl Into<Vec<u8>>) -> Reply {
        self.try_request(method, path, body.into())
            .await
            .expect("request")
    }

    /// POSTs `req` to `path`, insists on 200 and decodes the JSON answer.
    async fn post_ok<T: serde::de::DeserializeOwned>(&self, path: &str, req: Value) -> T {
        let r = self.request("POST", path, req.to_string()).await;
        assert_eq!(
            r.status,
            StatusCode::OK,
            "{}",
            String::from_utf8_lossy(&r.body)
        );
        serde_json::from_slice(&r.body).unwrap()
    }

    pub async fn py_req(&self, req: Value) -> PythonResponse {
        self.post_ok("/execute/python", req).await
    }

    pub async fn py(&self, code: &str) -> PythonResponse {
        self.py_req(json!({ "code": code })).await
    }

    pub async fn sh(&self, req: Value) -> ShellResponse {
        self.post_ok("/execute/shell", req).await
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        // SIGTERM: the agent shuts down and its Python goes with it.
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

pub fn have(cmd: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {cmd}")])
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}
