//! `--init`: the agent as PID 1 of a real pid namespace.

mod common;

use std::time::{Duration, Instant};

use common::{have, is_root, Agent};
use serde_json::json;

#[tokio::test]
async fn pid_one_reaps_orphans_and_forwards_sigterm() {
    if !is_root() || !have("unshare") {
        eprintln!("SKIP pid_one_reaps_orphans_and_forwards_sigterm: needs root and unshare for a pid namespace");
        return;
    }
    let mut a = Agent::start_with("init", |mut argv, _| {
        argv.insert(1, "--init".into());
        let mut v: Vec<String> = ["unshare", "--pid", "--fork", "--kill-child", "--mount-proc"]
            .map(String::from)
            .to_vec();
        v.extend(argv);
        v
    })
    .await;
    let r = a
        .sh(json!({"command": "cat /proc/1/comm; echo $PPID"}))
        .await;
    assert_eq!(
        r.stdout, "sessiond-agent\n2\n",
        "agent should be PID 2 under its init"
    );
    // The orphaned sleep is reparented to PID 1, which must reap it.
    let r = a
        .sh(json!({"command": "sh -c 'sleep 0.2 & exit 0'; sleep 1; cat /proc/[0-9]*/stat | grep -c ') Z ' || true"}))
        .await;
    assert_eq!(r.stdout.trim(), "0", "zombies left: {r:?}");
    assert_eq!(a.py("1 + 1").await.result, json!(2));
    // SIGTERM to PID 1 reaches the agent, which shuts down; init exits with it.
    let unshare = a.child.id();
    let init_pid: i32 = std::fs::read_to_string(format!("/proc/{unshare}/task/{unshare}/children"))
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(init_pid),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = a.child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "init did not exit after SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status:?}");
}
