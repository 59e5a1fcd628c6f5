//! End-to-end checks of `sessiond serve` that the Python suite cannot make
//! cheaply: concurrent first calls sharing one session, the pool limit,
//! cooldown expiry, pool persistence across a restart, and that SIGTERM
//! leaves no sandbox behind. They run the real daemon on real jails, so they
//! need root, the guest rootfs and the agent binary; without them they print
//! why and return.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use common::{request, Daemon, Response};

const V1: &str = "api-version=2024-02-02-preview";
const V2: &str = "api-version=2025-02-02-preview";
const READ_TIMEOUT: Duration = Duration::from_secs(60);
const POOLS: &str = "[[pools]]\nname = \"tp\"\nmaxConcurrentSessions = 2\nreadySessionInstances = 1\ncooldownPeriodInSeconds = 2\n";

fn environment() -> Option<(PathBuf, PathBuf)> {
    common::environment("sessiond serve")
}

fn start(dir: &Path, rootfs: &Path, agent: &Path) -> Daemon {
    Daemon::start(dir, rootfs, agent, 2_000_000, POOLS, READ_TIMEOUT)
}

impl Daemon {
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
        self.sandboxes_left()
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
    let d = start(&dir, &rootfs, &agent);
    phase("daemon listening");

    // Concurrent first calls with one new identifier share one session.
    let socket = d.socket.clone();
    let threads: Vec<_> = (0..6)
        .map(|_| {
            let socket = socket.clone();
            std::thread::spawn(move || {
                request(
                    &socket,
                    READ_TIMEOUT,
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

    let d = start(&dir, &rootfs, &agent);
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

/// The init helpers of a daemon's sandboxes (jail-init processes it started).
fn init_helpers(daemon: u32) -> Vec<i32> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        // pid (comm) state ppid ...: the comm may hold spaces, the rest follows its ')'.
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        if ppid == Some(daemon) && String::from_utf8_lossy(&cmdline).contains("jail-init") {
            found.push(pid);
        }
    }
    found
}

#[test]
fn sandboxes_die_with_a_killed_daemon() {
    let Some((rootfs, agent)) = environment() else {
        return;
    };
    let dir = PathBuf::from(format!("/tmp/sessiond-killed-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let mut d = Daemon::start(&dir, &rootfs, &agent, 2_600_000, POOLS, READ_TIMEOUT);
    // A session, and the ready sandbox the pool keeps.
    let r = d.exec("victim", "1 + 1");
    assert_eq!(r.status, 200, "{:?}", r.body);
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut helpers = init_helpers(d.child.id());
    while helpers.len() < 2 {
        assert!(
            Instant::now() < deadline,
            "sandboxes never started: {helpers:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
        helpers = init_helpers(d.child.id());
    }
    // No shutdown at all: the daemon is killed outright.
    d.child.kill().unwrap();
    d.child.wait().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let alive = |pids: &[i32]| -> Vec<i32> {
        pids.iter()
            .copied()
            .filter(|p| std::path::Path::new(&format!("/proc/{p}")).exists())
            .collect()
    };
    while !alive(&helpers).is_empty() {
        assert!(
            Instant::now() < deadline,
            "init helpers outlived the daemon: {:?}",
            alive(&helpers)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = std::fs::remove_dir_all(&dir);
}
