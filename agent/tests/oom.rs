//! The memory cgroup's OOM killer takes the interpreter, never the agent.

mod common;

use std::path::PathBuf;

use common::{is_root, Agent};
use serde_json::json;
use sessiond_agent::proto::ExecStatus;

/// A memory cgroup (v1) below this process's own, removed on drop.
struct MemoryCgroup(PathBuf);

impl MemoryCgroup {
    fn create(limit: u64) -> Result<MemoryCgroup, String> {
        let own = std::fs::read_to_string("/proc/self/cgroup").map_err(|e| e.to_string())?;
        let rel = own
            .lines()
            .find_map(|l| {
                let mut f = l.splitn(3, ':');
                let (_, ctrl, path) = (f.next()?, f.next()?, f.next()?);
                ctrl.split(',')
                    .any(|c| c == "memory")
                    .then(|| path.to_string())
            })
            .ok_or("no cgroup v1 memory controller")?;
        let base = PathBuf::from("/sys/fs/cgroup/memory").join(rel.trim_start_matches('/'));
        let dir = base.join(format!("sessiond-agent-oom-{}", std::process::id()));
        std::fs::create_dir(&dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
        let cg = MemoryCgroup(dir);
        std::fs::write(cg.0.join("memory.limit_in_bytes"), limit.to_string())
            .map_err(|e| e.to_string())?;
        let memsw = cg.0.join("memory.memsw.limit_in_bytes");
        if memsw.exists() {
            std::fs::write(memsw, limit.to_string()).map_err(|e| e.to_string())?;
        }
        Ok(cg)
    }
}

impl Drop for MemoryCgroup {
    fn drop(&mut self) {
        for _ in 0..100 {
            if std::fs::remove_dir(&self.0).is_ok() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}

#[tokio::test]
async fn memory_hog_kills_python_not_the_agent() {
    if !is_root() {
        eprintln!("SKIP memory_hog_kills_python_not_the_agent: needs root to make a memory cgroup");
        return;
    }
    let cg = match MemoryCgroup::create(256 * 1024 * 1024) {
        Ok(cg) => cg,
        Err(e) => {
            eprintln!("SKIP memory_hog_kills_python_not_the_agent: {e}");
            return;
        }
    };
    let procs = cg.0.join("cgroup.procs");
    let a = Agent::start_with("oom", |argv, _| {
        let mut v: Vec<String> = vec![
            "sh".into(),
            "-c".into(),
            "echo $$ > \"$0\" && exec \"$@\"".into(),
            procs.display().to_string(),
        ];
        v.extend(argv);
        v
    })
    .await;
    a.py("kept = 1").await;
    let r = a.py("hog = b'\\x01' * (1 << 30)").await;
    assert_eq!(r.status, ExecStatus::Failure, "{r:?}");
    assert!(r.restarted);
    assert!(
        r.stderr.contains("signal 9, likely out of memory"),
        "{}",
        r.stderr
    );
    // The agent survived and serves a fresh interpreter.
    assert_eq!(a.py("'kept' in globals()").await.result, json!(false));
    assert_eq!(
        a.request("GET", "/health", "").await.json()["python_ready"],
        json!(true)
    );
    drop(a);
    drop(cg);
}
