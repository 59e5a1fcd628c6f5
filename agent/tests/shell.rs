//! Shell executions through the real agent.

mod common;

use std::time::Instant;

use common::Agent;
use serde_json::json;
use sessiond_agent::proto::ExecStatus;

#[tokio::test]
async fn exit_code_and_streams() {
    let a = Agent::start("shell").await;
    let r = a
        .sh(json!({"command": "echo out; echo err >&2; exit 3"}))
        .await;
    assert_eq!(r.status, ExecStatus::Success);
    assert_eq!(r.exit_code, Some(3));
    assert_eq!((r.stdout.as_str(), r.stderr.as_str()), ("out\n", "err\n"));
    let r = a.sh(json!({"command": "pwd"})).await;
    assert_eq!(
        r.stdout.trim(),
        a.data().canonicalize().unwrap().display().to_string()
    );
    let r = a.sh(json!({"argv": ["printf", "%s-%s", "a b", "c"]})).await;
    assert_eq!((r.exit_code, r.stdout.as_str()), (Some(0), "a b-c"));
    let r = a
        .sh(json!({"command": "tr a-z A-Z", "stdin": "shout"}))
        .await;
    assert_eq!(r.stdout, "SHOUT");
    let r = a.sh(json!({"argv": ["no-such-program-here"]})).await;
    assert_eq!((r.status, r.exit_code), (ExecStatus::Failure, Some(127)));
    let r = a.sh(json!({"command": "kill -9 $$"})).await;
    assert_eq!((r.status, r.exit_code), (ExecStatus::Failure, None));
    assert!(r.stderr.contains("signal 9"));
}

#[tokio::test]
async fn timeout_kills_the_process_group() {
    let a = Agent::start("shell-timeout").await;
    let started = Instant::now();
    let r = a
        .sh(json!({"command": "sleep 100 & echo $! > bg.pid; echo started; sleep 100", "timeout_ms": 300}))
        .await;
    assert!(started.elapsed().as_secs() < 10);
    assert_eq!((r.status, r.exit_code), (ExecStatus::Timeout, None));
    assert_eq!(r.stdout, "started\n");
    assert!(
        r.stderr.contains("execution timed out after 0.3 s"),
        "{}",
        r.stderr
    );
    let pid: i32 = std::fs::read_to_string(a.data().join("bg.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    // The backgrounded sleep is gone (or at most a zombie awaiting its reaper).
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    assert!(
        stat.is_empty() || stat.contains(") Z "),
        "background process survived: {stat}"
    );
}

#[tokio::test]
async fn background_process_does_not_hold_the_reply() {
    let a = Agent::start("shell-bg").await;
    let started = Instant::now();
    let r = a
        .sh(json!({"command": "echo hi; sleep 30 &", "timeout_ms": 20000}))
        .await;
    assert_eq!(
        (r.status, r.exit_code, r.stdout.as_str()),
        (ExecStatus::Success, Some(0), "hi\n")
    );
    assert!(started.elapsed().as_secs() < 5);
}

#[tokio::test]
async fn output_cap_and_bad_requests() {
    let a = Agent::start("shell-cap").await;
    let r = a
        .sh(json!({"command": "yes | head -c 100000", "max_output": 10}))
        .await;
    assert_eq!(r.stdout, "y\ny\ny\ny\ny\n\n[output truncated]\n");
    for bad in [
        json!({}),
        json!({"command": "x", "argv": ["x"]}),
        json!({"argv": []}),
    ] {
        let r = a.request("POST", "/execute/shell", bad.to_string()).await;
        assert_eq!(r.status, 400, "{bad}");
        assert_eq!(r.json()["code"], json!("BadRequest"));
    }
}

#[tokio::test]
async fn commands_run_as_plain_sh_c_but_go_first_on_oom() {
    let a = Agent::start("shell-oom").await;
    let r = a
        .sh(json!({"command": "echo \"$0|$#|$1\"; cat /proc/self/oom_score_adj /proc/$$/oom_score_adj"}))
        .await;
    assert_eq!(r.exit_code, Some(0), "{r:?}");
    assert_eq!(r.stdout, "/bin/sh|0|\n1000\n1000\n");
    assert_eq!(r.stderr, "");
    // Quoting, syntax errors and exit codes are the command's own.
    let r = a.sh(json!({"command": "printf '%s' \"it's\" '$1'"})).await;
    assert_eq!(r.stdout, "it's$1");
    let r = a.sh(json!({"command": "if then"})).await;
    assert_eq!(r.exit_code, Some(2));
    assert!(r.stderr.contains("Syntax error"), "{}", r.stderr);
}
