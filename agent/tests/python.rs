//! Python execution through the real agent and a real `python3`.

mod common;

use std::path::PathBuf;

use common::{have, is_root, Agent};
use serde_json::json;
use sessiond_agent::proto::ExecStatus;

#[tokio::test]
async fn state_survives_between_calls() {
    let a = Agent::start("state").await;
    let r = a.py("x = 41\ndef f(y):\n    return y + 1").await;
    assert_eq!(r.status, ExecStatus::Success);
    assert_eq!(r.result, json!(""));
    let r = a.py("f(x)").await;
    assert_eq!(r.result, json!(42));
    assert!(!r.restarted);
}

#[tokio::test]
async fn trailing_expression_follows_notebook_rules() {
    let a = Agent::start("results").await;
    let cases = [
        ("1 + 1", json!(2)),
        ("2.5", json!(2.5)),
        ("True", json!(true)),
        ("'hello'", json!("hello")),
        ("None", json!("")),
        ("[1, 'a']", json!("[1, 'a']")),
        ("float('nan')", json!("nan")),
        ("float('inf')", json!("inf")),
        ("2**100", json!("1267650600228229401496703205376")),
        ("x = 3", json!("")),
        ("print('p')", json!("")),
        (
            "class C:\n    def __repr__(self):\n        return 'C!'\nC()",
            json!("C!"),
        ),
        ("", json!("")),
    ];
    for (code, want) in cases {
        let r = a.py(code).await;
        assert_eq!(r.status, ExecStatus::Success, "{code}: {}", r.stderr);
        assert_eq!(r.result, want, "{code}");
    }
}

#[tokio::test]
async fn exception_is_a_failure_with_the_cell_traceback() {
    let a = Agent::start("exception").await;
    let r = a.py("def boom():\n    return 1 / 0\nboom()").await;
    assert_eq!(r.status, ExecStatus::Failure);
    assert!(
        r.stderr.starts_with("Traceback (most recent call last):"),
        "{}",
        r.stderr
    );
    assert!(r.stderr.contains("ZeroDivisionError: division by zero"));
    assert!(
        r.stderr.contains("return 1 / 0"),
        "cell source line missing: {}",
        r.stderr
    );
    assert!(
        !r.stderr.contains("_run_cell"),
        "runner frames leak: {}",
        r.stderr
    );
    // Frames of strings the user exec()s are theirs and stay.
    let r = a.py("exec('1 / 0')").await;
    assert!(r.stderr.contains("File \"<string>\""), "{}", r.stderr);
    assert!(!r.stderr.contains("sessiond-runner"), "{}", r.stderr);
    let r = a.py("def broken(:").await;
    assert_eq!(r.status, ExecStatus::Failure);
    assert!(r.stderr.contains("SyntaxError"), "{}", r.stderr);
    // The session is still usable, and SystemExit does not end it.
    let r = a.py("import sys\nsys.exit(3)").await;
    assert_eq!(r.status, ExecStatus::Failure);
    assert!(r.stderr.contains("SystemExit"));
    assert_eq!(a.py("boom.__name__").await.result, json!("boom"));
}

#[tokio::test]
async fn stdout_and_stderr_include_subprocess_output_in_order() {
    let a = Agent::start("streams").await;
    let code = "import os, subprocess, sys\n\
                print('one')\n\
                os.system('echo two; echo err-sub >&2')\n\
                subprocess.run(['echo', 'three'])\n\
                sys.stderr.write('err-py\\n')\n\
                print('four')";
    let r = a.py(code).await;
    assert_eq!(r.status, ExecStatus::Success);
    assert_eq!(r.stdout, "one\ntwo\nthree\nfour\n");
    assert_eq!(r.stderr, "err-sub\nerr-py\n");
    // Output belongs to its own execution.
    let r = a.py("1").await;
    assert_eq!((r.stdout.as_str(), r.stderr.as_str()), ("", ""));
}

#[tokio::test]
async fn output_is_capped() {
    let a = Agent::start("cap").await;
    let r = a
        .py_req(json!({"code": "print('x' * 5000)\nimport os\nos.system('head -c 5000 /dev/zero | tr \"\\\\0\" y >&2')", "max_output": 1000}))
        .await;
    assert_eq!(r.status, ExecStatus::Success, "{}", r.stderr);
    assert!(r.stdout.starts_with(&"x".repeat(1000)));
    assert!(
        r.stdout.ends_with("[output truncated]\n"),
        "{:?}",
        &r.stdout[1000..]
    );
    assert!(r.stdout.len() < 1100);
    assert!(r.stderr.starts_with(&"y".repeat(1000)));
    assert!(r.stderr.ends_with("[output truncated]\n"));
    // A print loop far past the cap finishes and stays capped.
    let r = a
        .py_req(json!({"code": "for i in range(200000):\n    print(i)", "max_output": 100}))
        .await;
    assert!(r.stdout.len() < 200 && r.stdout.contains("[output truncated]"));
}

#[tokio::test]
async fn timeout_interrupts_and_keeps_state() {
    let a = Agent::start("timeout").await;
    a.py("kept = 'yes'").await;
    let r = a
        .py_req(json!({"code": "import subprocess, time\np = subprocess.Popen(['sleep', '1000'])\ntime.sleep(60)", "timeout_ms": 500}))
        .await;
    assert_eq!(r.status, ExecStatus::Timeout);
    assert!(!r.restarted);
    assert!(
        r.stderr.contains("execution timed out after 0.5 s"),
        "{}",
        r.stderr
    );
    assert!(r.stderr.contains("KeyboardInterrupt"));
    let r = a.py("kept").await;
    assert_eq!((r.status, r.result), (ExecStatus::Success, json!("yes")));
    // The process the cell forked was killed after the timeout.
    assert_eq!(a.py("p.wait(timeout=5)").await.result, json!(-9));
}

#[tokio::test]
async fn uninterruptible_code_restarts_the_interpreter() {
    let a = Agent::start("uninterruptible").await;
    a.py("lost = 1").await;
    let code = "import signal\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\nwhile True:\n    pass";
    let r = a.py_req(json!({"code": code, "timeout_ms": 300})).await;
    assert_eq!(r.status, ExecStatus::Timeout);
    assert!(r.restarted);
    assert!(
        r.stderr.contains("execution timed out after 0.3 s"),
        "{}",
        r.stderr
    );
    assert!(r.stderr.contains("state was lost"));
    let r = a.py("'lost' in globals()").await;
    assert_eq!((r.status, r.result), (ExecStatus::Success, json!(false)));
}

#[tokio::test]
async fn killed_interpreter_is_reported_and_restarted() {
    let a = Agent::start("killed").await;
    let r = a
        .py("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)")
        .await;
    assert_eq!(r.status, ExecStatus::Failure);
    assert!(r.restarted);
    assert!(
        r.stderr
            .contains("killed (signal 9, likely out of memory); interpreter restarted, state lost"),
        "{}",
        r.stderr
    );
    assert_eq!(a.py("6 * 7").await.result, json!(42));
    // A plain exit of the process is reported too.
    let r = a.py("import os\nos._exit(4)").await;
    assert!(
        r.restarted && r.stderr.contains("exited with code 4"),
        "{}",
        r.stderr
    );
}

#[tokio::test]
async fn runs_in_the_data_dir_with_env_from_init() {
    let a = Agent::start("cwd").await;
    let r = a
        .request(
            "POST",
            "/init",
            json!({"env": [["GREETING", "hi"]], "entropy_hex": "00ff", "session_id": "s1"})
                .to_string(),
        )
        .await;
    assert_eq!(r.status, 200);
    let r = a.py("import os\nopen('made-by-python.txt', 'w').write('x')\n(os.getcwd(), os.environ['GREETING'])").await;
    assert_eq!(r.status, ExecStatus::Success, "{}", r.stderr);
    let data = a.data().canonicalize().unwrap();
    assert_eq!(r.result, json!(format!("('{}', 'hi')", data.display())));
    assert!(data.join("made-by-python.txt").exists());
    let r = a
        .request("POST", "/init", json!({"entropy_hex": "xyz"}).to_string())
        .await;
    assert_eq!(
        (r.status.as_u16(), r.json()["code"].clone()),
        (400, json!("BadRequest"))
    );
}

#[tokio::test]
async fn malformed_requests_are_refused() {
    let a = Agent::start("malformed").await;
    let r = a.request("POST", "/execute/python", "{not json").await;
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["code"], json!("BadRequest"));
    let r = a
        .request(
            "POST",
            "/execute/python",
            json!({"code": "1", "bogus": 1}).to_string(),
        )
        .await;
    assert_eq!(r.status, 400);
    assert_eq!(a.py("1").await.result, json!(1));
}

/// Root of the guest image when it is built (it has matplotlib).
fn rootfs() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("SESSIOND_ROOTFS") {
        return Some(p.into());
    }
    let mut found: Vec<_> = std::fs::read_dir("/var/cache/sessiond/rootfs")
        .ok()?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.join(".complete").exists() && p.join("usr/bin/python3").exists())
        .filter_map(|p| Some((p.metadata().ok()?.modified().ok()?, p)))
        .collect();
    found.sort();
    found.pop().map(|(_, p)| p)
}

#[tokio::test]
async fn matplotlib_figures_come_back_as_png() {
    let host_has_it = std::process::Command::new("python3")
        .args(["-c", "import matplotlib"])
        .stderr(std::process::Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    let a = if host_has_it {
        Agent::start("mpl").await
    } else {
        // The guest image's python, in a private mount namespace chrooted
        // into the image, with the data dir bound at /mnt/data.
        let Some(root) = rootfs() else {
            eprintln!("SKIP matplotlib test: host python3 lacks matplotlib and no guest rootfs is built (the e2e suite covers it)");
            return;
        };
        if !is_root() || !have("unshare") {
            eprintln!("SKIP matplotlib test: host python3 lacks matplotlib and chrooting into the rootfs needs root and unshare");
            return;
        }
        Agent::start_with("mpl", |mut argv, dir| {
            // The rootfs is shared and must stay untouched: it is bound
            // read-only, with a private tmpfs on /tmp.
            let wrapper = dir.join("python-in-rootfs");
            let inner = dir.join("python-in-rootfs-inner");
            let mnt = dir.join("root");
            std::fs::create_dir(&mnt).unwrap();
            let (root, mnt) = (root.display(), mnt.display());
            write_script(
                &wrapper,
                &format!("exec unshare -m --propagation private {} \"$@\"", inner.display()),
            );
            write_script(
                &inner,
                &format!(
                    "set -e\n\
                     mount --bind {root} {mnt}\n\
                     mount -o remount,bind,ro {mnt}\n\
                     mount --bind \"$PWD\" {mnt}/mnt/data\n\
                     mount -t tmpfs tmpfs {mnt}/tmp\n\
                     exec chroot {mnt} /usr/bin/env -C /mnt/data HOME=/nonexistent /usr/bin/python3 \"$@\""
                ),
            );
            argv.push("--python".into());
            argv.push(wrapper.display().to_string());
            argv
        })
        .await
    };
    assert_eq!(
        a.py("import sys\n'matplotlib' in sys.modules").await.result,
        json!(false),
        "the runner must not import matplotlib itself"
    );
    let r = a
        .py("import matplotlib.pyplot as plt\nplt.plot([1, 2, 3])\nplt.show()")
        .await;
    assert_eq!(r.status, ExecStatus::Success, "{}", r.stderr);
    assert_eq!(r.stderr, "", "plt.show() must not warn");
    assert_eq!(r.result["type"], json!("image"));
    assert_eq!(r.result["format"], json!("png"));
    let b64 = r.result["base64_data"].as_str().unwrap();
    assert!(
        b64.starts_with("iVBORw0KGgo"),
        "not a PNG: {}",
        &b64[..16.min(b64.len())]
    );
    // Two figures and a value: the value is the result, both figures display.
    let r = a
        .py("plt.figure(); plt.plot([1]); plt.figure(); plt.plot([2])\n7")
        .await;
    assert_eq!(r.result, json!(7));
    assert_eq!(r.display.len(), 2);
    // Figures are closed after being sent.
    assert_eq!(a.py("len(plt.get_fignums())").await.result, json!(0));
    // numpy scalars are numbers, arrays their repr.
    assert_eq!(
        a.py("import numpy as np\nnp.int64(6)").await.result,
        json!(6)
    );
    assert_eq!(a.py("np.float64(0.5)").await.result, json!(0.5));
    assert_eq!(a.py("np.arange(3)").await.result, json!("array([0, 1, 2])"));
}

fn write_script(path: &std::path::Path, body: &str) {
    std::fs::write(path, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
}

#[tokio::test]
async fn interpreter_killed_while_idle_is_replaced_before_the_next_cell() {
    let a = Agent::start("idle-kill").await;
    let pid = a
        .py("import os\nos.getpid()")
        .await
        .result
        .as_i64()
        .unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let r = a.py("'ran'").await;
    assert_eq!(
        (r.status, r.result.clone()),
        (ExecStatus::Success, json!("ran"))
    );
    assert!(r.restarted);
    assert!(
        r.stderr.contains("signal 9") && r.stderr.contains("state lost"),
        "{}",
        r.stderr
    );
}

#[tokio::test]
async fn binary_writes_to_stdout_are_captured() {
    let a = Agent::start("buffer").await;
    let r = a
        .py("import sys\nsys.stdout.buffer.write(b'raw\\n')\nsys.stdout.flush()")
        .await;
    assert_eq!(r.status, ExecStatus::Success, "{}", r.stderr);
    assert_eq!(r.stdout, "raw\n");
}

#[tokio::test]
async fn forked_processes_do_not_answer_and_die_with_a_timeout() {
    let a = Agent::start("fork").await;
    // A child that falls through the end of the cell must stay silent.
    let r = a
        .py("import os\nchild = os.fork()\n'parent' if child else 'child'")
        .await;
    assert_eq!(r.result, json!("parent"));
    assert_eq!(a.py("os.waitpid(child, 0)[1]").await.result, json!(0));
    // Children that fork again are all gone after a timeout.
    let runner = a.py("os.getpid()").await.result.as_i64().unwrap() as i32;
    let code = "import time\nfor i in range(10):\n    if os.fork() == 0:\n        os.fork()\n        time.sleep(100)\n        os._exit(0)\ntime.sleep(100)";
    let r = a.py_req(json!({"code": code, "timeout_ms": 500})).await;
    assert_eq!((r.status, r.restarted), (ExecStatus::Timeout, false));
    let left = sessiond_agent::procs::group_members(runner, runner);
    assert!(
        left.is_empty(),
        "processes left in the runner's group: {left:?}"
    );
    assert_eq!(a.py("'still here'").await.result, json!("still here"));
}
