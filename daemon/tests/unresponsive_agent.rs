//! A sandbox whose agent stops answering (here: SIGSTOPped by code running
//! in the sandbox, which shares the agent's uid) must not hang the caller or
//! pin a pool slot: the call fails at its deadline with 502
//! `SessionSandboxUnresponsive`, the session and its sandbox are destroyed,
//! and the next call with the identifier gets a fresh session. Runs the real
//! daemon on real jails; needs root, the guest rootfs and the agent binary.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::json;

use common::{Daemon, Response};

const V2: &str = "api-version=2025-02-02-preview";
/// Mirrors `agent_client::Deadlines::default()`.
const CALL_DEADLINE: Duration = Duration::from_secs(10);
const EXEC_GRACE: Duration = Duration::from_secs(20);
/// Scheduling slack on a loaded 2-core machine.
const SLACK: Duration = Duration::from_secs(8);

const POOLS: &str = "[[pools]]\nname = \"sh\"\ncontainerType = \"Shell\"\nmaxConcurrentSessions = 1\nreadySessionInstances = 0\ncooldownPeriodInSeconds = 600\n";

fn environment() -> Option<(PathBuf, PathBuf)> {
    common::environment("unresponsive-agent")
}

impl Daemon {
    fn shell(&self, id: &str, command: &str, timeout_s: u64) -> Response {
        self.call(
            "POST",
            &format!("/pools/sh/executions?identifier={id}&{V2}"),
            Some(&json!({"shellCommand": command, "timeoutInSeconds": timeout_s})),
        )
    }

    fn upload(&self, id: &str, name: &str, content: &str) -> Response {
        let body = format!(
            "--B\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{name}\"\r\n\r\n{content}\r\n--B--\r\n"
        );
        let mut s = UnixStream::connect(&self.socket).unwrap();
        write!(
            s,
            "POST /pools/sh/files?identifier={id}&{V2} HTTP/1.1\r\nHost: t\r\nConnection: close\r\nContent-Type: multipart/form-data; boundary=B\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        let mut raw = String::new();
        s.read_to_string(&mut raw).unwrap();
        Response::parse(&raw)
    }

    fn session_count(&self) -> usize {
        let r = self.call("GET", "/management/pools/sh/sessions", None);
        r.body["value"].as_array().map_or(0, Vec::len)
    }
}

fn assert_destroyed(d: &Daemon, r: &Response, took: Duration, deadline: Duration) {
    assert_eq!(r.status, 502, "{:?}; log: {}", r.body, d.log());
    assert_eq!(
        r.body["error"]["code"], "SessionSandboxUnresponsive",
        "{:?}",
        r.body
    );
    assert!(
        r.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("next call with this identifier starts a new session"),
        "{:?}",
        r.body
    );
    assert!(
        took >= deadline,
        "answered after {took:?}, before the {deadline:?} deadline"
    );
    assert!(
        took < deadline + SLACK,
        "answered after {took:?}, deadline {deadline:?}"
    );
    // The slot is free again (maxConcurrentSessions is 1) and the sandbox
    // is destroyed, not just forgotten.
    assert_eq!(d.session_count(), 0);
    let t = Instant::now();
    while d.sandboxes_left() > 0 && t.elapsed() < Duration::from_secs(15) {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        d.sandboxes_left(),
        0,
        "sandbox not destroyed; log: {}",
        d.log()
    );
}

#[test]
fn a_stopped_agent_costs_its_session_not_the_pool() {
    let Some((rootfs, agent)) = environment() else {
        return;
    };
    let dir = PathBuf::from(format!(
        "/tmp/sessiond-unresponsive-test-{}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let d = Daemon::start(
        &dir,
        &rootfs,
        &agent,
        2_300_000,
        POOLS,
        Duration::from_secs(120),
    );

    // An execution that stops the agent before it can answer: the call
    // fails at the execution's timeout plus the grace.
    let r = d.shell("stopper", "echo hi", 5);
    assert_eq!(r.status, 200, "{:?}; log: {}", r.body, d.log());
    let t = Instant::now();
    let r = d.shell("stopper", "kill -STOP $(pgrep -x sessiond-agent)", 1);
    assert_destroyed(&d, &r, t.elapsed(), Duration::from_secs(1) + EXEC_GRACE);

    // The identifier works again, on a fresh sandbox.
    let r = d.shell(
        "stopper",
        "test -e /mnt/data/mark && echo old || echo fresh; touch /mnt/data/mark",
        5,
    );
    assert_eq!(r.status, 200, "{:?}; log: {}", r.body, d.log());
    assert_eq!(r.body["result"]["stdout"], "fresh\n");

    // Uploads and downloads still stream through the deadlines.
    let r = d.upload("stopper", "up.txt", &"u".repeat(300_000));
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.body["sizeInBytes"], 300_000, "{:?}", r.body);
    let r = d.call(
        "GET",
        &format!("/pools/sh/files/up.txt/content?identifier=stopper&{V2}"),
        None,
    );
    assert_eq!(r.status, 200);
    assert_eq!(r.body.as_str().map(str::len), Some(300_000));

    // An agent stopped between calls: a file lookup fails at the short
    // call deadline. The stop comes from a process outside the execution's
    // process group, after the execution has answered.
    let r = d.shell(
        "stopper",
        "setsid sh -c 'sleep 1; kill -STOP $(pgrep -x sessiond-agent)' >/dev/null 2>&1 < /dev/null &",
        5,
    );
    assert_eq!(r.status, 200, "{:?}", r.body);
    std::thread::sleep(Duration::from_secs(3));
    let t = Instant::now();
    let r = d.call(
        "GET",
        &format!("/pools/sh/files/mark?identifier=stopper&{V2}"),
        None,
    );
    assert_destroyed(&d, &r, t.elapsed(), CALL_DEADLINE);

    let r = d.shell("stopper", "echo back", 5);
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.body["result"]["stdout"], "back\n");
    drop(d);
    let _ = std::fs::remove_dir_all(&dir);
}
