//! Runs the real `sessiond serve` on real jails for the end-to-end tests and
//! talks HTTP/1.1 to its Unix socket. Each test crate uses part of it.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

fn rootfs() -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os("SESSIOND_ROOTFS") {
        return Ok(PathBuf::from(p));
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/build-rootfs");
    let out = Command::new(&script)
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| format!("running {}: {e}", script.display()))?;
    let path = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    if out.status.success() && path.join("usr/bin/python3").exists() {
        Ok(path)
    } else {
        Err(format!("{} gave no usable rootfs", script.display()))
    }
}

/// The rootfs and agent binary, or `None` after printing why `test` skips.
pub fn environment(test: &str) -> Option<(PathBuf, PathBuf)> {
    let reason = (|| {
        if !nix::unistd::geteuid().is_root() {
            return Err("needs root (namespaces, cgroups, mounts)".to_string());
        }
        let agent = Path::new(env!("CARGO_BIN_EXE_sessiond")).with_file_name("sessiond-agent");
        if !agent.is_file() {
            return Err(format!(
                "agent {} missing: run `cargo build -p sessiond-agent`",
                agent.display()
            ));
        }
        Ok((rootfs()?, agent))
    })();
    match reason {
        Ok(env) => Some(env),
        Err(r) => {
            eprintln!("skipping {test} test: {r}");
            None
        }
    }
}

pub struct Response {
    pub status: u16,
    /// The status line and headers, lowercased.
    pub headers: String,
    pub body: Value,
}

impl Response {
    /// Splits a raw HTTP/1.1 response; a body that is not JSON is kept as a
    /// string, an empty one is `null`.
    pub fn parse(text: &str) -> Response {
        let (head, rest) = text.split_once("\r\n\r\n").expect("HTTP response");
        let body = if rest.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(rest).unwrap_or(Value::String(rest.to_string()))
        };
        Response {
            status: head[9..12].parse().unwrap(),
            headers: head.to_ascii_lowercase(),
            body,
        }
    }
}

/// One HTTP/1.1 request on a fresh connection to the daemon's socket.
pub fn request(
    socket: &Path,
    read_timeout: Duration,
    method: &str,
    path: &str,
    body: Option<&Value>,
) -> Response {
    let mut s = UnixStream::connect(socket).expect("connect to the API socket");
    s.set_read_timeout(Some(read_timeout)).unwrap();
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    Response::parse(&String::from_utf8_lossy(&raw))
}

pub struct Daemon {
    pub child: Child,
    pub dir: PathBuf,
    pub socket: PathBuf,
    /// How long `call` waits for an answer.
    pub read_timeout: Duration,
}

impl Daemon {
    /// Starts the daemon in `dir` with `uid_base` and the `[[pools]]` TOML in
    /// `pools`, and waits until it listens.
    pub fn start(
        dir: &Path,
        rootfs: &Path,
        agent: &Path,
        uid_base: u32,
        pools: &str,
        read_timeout: Duration,
    ) -> Daemon {
        let socket = dir.join("api.sock");
        let config = dir.join("config.toml");
        std::fs::write(
            &config,
            format!(
                "listen_unix = {socket:?}\nstate_dir = {state:?}\nrun_dir = {run:?}\nrootfs = {rootfs:?}\nagent_binary = {agent:?}\nuid_base = {uid_base}\n\n{pools}",
                state = dir.join("state"),
                run = dir.join("run"),
            ),
        )
        .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_sessiond"))
            .args(["serve", "--config"])
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("sessiond.log")).unwrap())
            .spawn()
            .expect("start sessiond");
        let mut d = Daemon {
            child,
            dir: dir.to_path_buf(),
            socket,
            read_timeout,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = d.child.try_wait() {
                panic!("sessiond exited with {status}; log: {}", d.log());
            }
            if UnixStream::connect(&d.socket).is_ok() {
                return d;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("sessiond did not listen; log: {}", d.log());
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("sessiond.log")).unwrap_or_default()
    }

    pub fn call(&self, method: &str, path: &str, body: Option<&Value>) -> Response {
        request(&self.socket, self.read_timeout, method, path, body)
    }

    /// Sandbox directories still on disk.
    pub fn sandboxes_left(&self) -> usize {
        std::fs::read_dir(self.dir.join("run/sandboxes"))
            .map(|d| d.count())
            .unwrap_or(0)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
