//! End-to-end checks of `sessiond serve` that the Python suite cannot make
//! cheaply: concurrent first calls sharing one session, the pool limit,
//! cooldown expiry, pool persistence across a restart, and that SIGTERM
//! leaves no sandbox behind. They run the real daemon on real jails, so they
//! need root, the guest rootfs and the agent binary; without them they print
//! why and return.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

const V1: &str = "api-version=2024-02-02-preview";
const V2: &str = "api-version=2025-02-02-preview";

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

fn environment() -> Option<(PathBuf, PathBuf)> {
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
            eprintln!("skipping sessiond serve test: {r}");
            None
        }
    }
}

struct Response {
    status: u16,
    headers: String,
    body: Value,
}

/// One HTTP/1.1 request on a fresh connection to the daemon's socket.
fn request(socket: &Path, method: &str, path: &str, body: Option<&Value>) -> Response {
    let mut s = UnixStream::connect(socket).expect("connect to the API socket");
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, rest) = text.split_once("\r\n\r\n").expect("HTTP response");
    let status = head[9..12].parse().unwrap();
    let body = if rest.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(rest).unwrap_or(Value::String(rest.to_string()))
    };
    Response {
        status,
        headers: head.to_ascii_lowercase(),
        body,
    }
}

struct Daemon {
    child: Child,
    dir: PathBuf,
    socket: PathBuf,
}

impl Daemon {
    fn start(dir: &Path, rootfs: &Path, agent: &Path) -> Daemon {
        let socket = dir.join("api.sock");
        let config = dir.join("config.toml");
        std::fs::write(
            &config,
            format!(
                "listen_unix = {socket:?}\nstate_dir = {state:?}\nrun_dir = {run:?}\nrootfs = {rootfs:?}\nagent_binary = {agent:?}\nuid_base = 2000000\n\n[[pools]]\nname = \"tp\"\nmaxConcurrentSessions = 2\nreadySessionInstances = 1\ncooldownPeriodInSeconds = 2\n",
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

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("sessiond.log")).unwrap_or_default()
    }

    fn call(&self, method: &str, path: &str, body: Option<&Value>) -> Response {
        request(&self.socket, method, path, body)
    }

    fn exec(&self, id: &str, code: &str) -> Response {
        self.call(
            "POST",
            &format!("/pools/tp/code/execute?identifier={id}&{V1}"),
            Some(&json!({"properties": {"code": code}})),
        )
    }

    fn sessions(&self) -> Vec<Value> {
        let r = self.call("GET", "/management/pools/tp/sessions", None);
        r.body["value"].as_array().cloned().unwrap_or_default()
    }

    /// SIGTERM and wait; returns how many sandbox directories remain.
    fn stop(mut self) -> usize {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        let status = self.child.wait().unwrap();
        assert!(
            status.success(),
            "sessiond exited with {status}; log: {}",
            self.log()
        );
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

#[test]
fn sessions_limits_cooldown_persistence_and_shutdown() {
    let Some((rootfs, agent)) = environment() else {
        return;
    };
    let dir = PathBuf::from(format!("/tmp/sessiond-serve-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let t0 = Instant::now();
    let phase = |name: &str| eprintln!("[{:>6.2}s] {name}", t0.elapsed().as_secs_f64());
    let d = Daemon::start(&dir, &rootfs, &agent);
    phase("daemon listening");

    // Concurrent first calls with one new identifier share one session.
    let socket = d.socket.clone();
    let threads: Vec<_> = (0..6)
        .map(|_| {
            let socket = socket.clone();
            std::thread::spawn(move || {
                request(
                    &socket,
                    "POST",
                    &format!("/pools/tp/code/execute?identifier=shared&{V1}"),
                    Some(&json!({"properties": {"code": "import os; os.getpid()"}})),
                )
            })
        })
        .collect();
    for t in threads {
        let r = t.join().unwrap();
        assert_eq!(r.status, 200, "{:?}", r.body);
        assert_eq!(r.body["properties"]["status"], "Success");
    }
    let sessions = d.sessions();
    assert_eq!(sessions.len(), 1, "{sessions:?}");
    phase("concurrent first calls served");

    // State and files stay with the session.
    assert_eq!(
        d.exec("shared", "open('f.txt','w').write('x'); y = 7")
            .status,
        200
    );
    assert_eq!(d.exec("shared", "y").body["properties"]["result"], 7);

    // The second identifier fits, the third hits maxConcurrentSessions.
    assert_eq!(d.exec("second", "1").status, 200);
    let full = d.exec("third", "1");
    assert_eq!(full.status, 429, "{:?}", full.body);
    assert_eq!(full.body["error"]["code"], "SessionPoolFull");
    assert!(full.headers.contains("retry-after:"), "{}", full.headers);

    // GET/DELETE session never allocate.
    let r = d.call(
        "GET",
        &format!("/pools/tp/session?identifier=ghost&{V2}"),
        None,
    );
    assert_eq!(r.status, 404);
    assert_eq!(r.body["error"]["code"], "SessionWithIdentifierNotFound");
    let r = d.call(
        "DELETE",
        &format!("/pools/tp/session?identifier=second&{V2}"),
        None,
    );
    assert_eq!(r.status, 204);
    assert_eq!(d.sessions().len(), 1);

    phase("limits checked");
    // Idle past the 2 s cooldown: destroyed, and its files are gone.
    std::thread::sleep(Duration::from_secs(4));
    assert!(d.sessions().is_empty(), "{:?}", d.sessions());
    let r = d.exec("shared", "import os; os.path.exists('f.txt')");
    assert_eq!(r.body["properties"]["result"], false, "{:?}", r.body);

    // A pool created through the API survives a restart.
    let r = d.call(
        "PUT",
        "/management/pools/made-by-api",
        Some(&json!({"properties": {"containerType": "Shell",
            "scaleConfiguration": {"maxConcurrentSessions": 1, "readySessionInstances": 0}}})),
    );
    assert_eq!(r.status, 201, "{:?}", r.body);
    phase("cooldown checked");
    assert_eq!(d.stop(), 0, "sandboxes left after SIGTERM");
    phase("stopped");

    let d = Daemon::start(&dir, &rootfs, &agent);
    phase("restarted");
    let r = d.call("GET", "/management/pools/made-by-api", None);
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.body["properties"]["containerType"], "Shell");
    assert_eq!(r.body["properties"]["source"], "api");
    let r = d.call(
        "POST",
        &format!("/pools/made-by-api/executions?identifier=sh-1&{V2}"),
        Some(&json!({"shellCommand": "echo hi; exit 4"})),
    );
    assert_eq!(r.body["status"], "4", "{:?}", r.body);
    assert_eq!(r.body["result"]["stdout"], "hi\n");
    assert_eq!(
        d.call("DELETE", "/management/pools/made-by-api", None)
            .status,
        204
    );
    assert_eq!(d.stop(), 0, "sandboxes left after SIGTERM");
    phase("stopped again");
    let _ = std::fs::remove_dir_all(&dir);
}
