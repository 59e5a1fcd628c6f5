//! The sandbox backends behind one enum, so the daemon core does not care
//! which isolation technology runs a session.

use std::path::Path;
use std::time::{Duration, Instant};

use crate::agent_client::AgentClient;
use crate::jail::{JailBackend, JailError, JailSandbox, JailSpec, SandboxLimits};
use crate::pool_spec::{ContainerType, PoolSpec};

/// How long a fresh sandbox may take to answer health with Python started.
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("jail backend")]
    Jail(#[from] JailError),
    #[error("sandbox {id} did not become ready within {secs} s (last error: {last})")]
    NotReady { id: String, secs: u64, last: String },
}

pub enum Backend {
    Jail(JailBackend),
}

pub enum Sandbox {
    Jail(JailSandbox),
}

impl Backend {
    /// Short name of the backend, for the API and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Backend::Jail(_) => "jail",
        }
    }

    /// Releases host resources the backend holds beyond its sandboxes; call
    /// once every sandbox was destroyed.
    pub fn shutdown(&self) {
        match self {
            Backend::Jail(j) => j.shutdown(),
        }
    }

    /// What isolation the backend gives, stated plainly for the API and CLI.
    pub fn isolation(&self) -> String {
        match self {
            Backend::Jail(j) => j.isolation(),
        }
    }

    /// Starts a sandbox for `pool` and waits until its agent is ready
    /// (Python started, for Python pools).
    pub async fn spawn_ready(&self, pool: &PoolSpec) -> Result<Sandbox, BackendError> {
        let sandbox_id = format!(
            "{}-{}",
            pool.name,
            &uuid::Uuid::new_v4().simple().to_string()[..12]
        );
        let spec = JailSpec {
            sandbox_id: sandbox_id.clone(),
            limits: SandboxLimits {
                memory_bytes: pool.memory_bytes,
                cpu_millicores: pool.cpu_millicores,
                pids_max: pool.pids_max,
                disk_bytes: pool.disk_bytes,
            },
            env: pool.env.clone(),
        };
        let mut sandbox = match self {
            Backend::Jail(j) => Sandbox::Jail(j.spawn(spec).await?),
        };
        let need_python = pool.container_type == ContainerType::PythonLTS;
        match wait_ready(&mut sandbox, need_python).await {
            Ok(()) => Ok(sandbox),
            Err(last) => {
                let id = sandbox.id().to_string();
                if let Err(e) = sandbox.destroy().await {
                    tracing::warn!(sandbox = %id, error = %crate::error_chain(&e), "destroying a sandbox that never became ready");
                }
                Err(BackendError::NotReady {
                    id,
                    secs: READY_TIMEOUT.as_secs(),
                    last,
                })
            }
        }
    }
}

async fn wait_ready(sandbox: &mut Sandbox, need_python: bool) -> Result<(), String> {
    let client = AgentClient::new(sandbox.agent_socket());
    let start = Instant::now();
    let mut last = String::from("no answer yet");
    let mut delay = Duration::from_millis(2);
    while start.elapsed() < READY_TIMEOUT {
        match client.health().await {
            Ok(h) if h.python_ready || !need_python => return Ok(()),
            Ok(_) => last = "agent up, Python not ready".into(),
            Err(e) => last = crate::error_chain(&e),
        }
        if !sandbox.is_alive() {
            return Err(format!("sandbox exited while starting ({last})"));
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_millis(50));
    }
    Err(last)
}

impl Sandbox {
    pub fn id(&self) -> &str {
        match self {
            Sandbox::Jail(s) => s.id(),
        }
    }

    pub fn agent_socket(&self) -> &Path {
        match self {
            Sandbox::Jail(s) => s.agent_socket(),
        }
    }

    pub fn is_alive(&mut self) -> bool {
        match self {
            Sandbox::Jail(s) => s.is_alive(),
        }
    }

    pub fn memory_private_bytes(&self) -> Option<u64> {
        match self {
            Sandbox::Jail(s) => s.memory_private_bytes(),
        }
    }

    pub async fn destroy(self) -> Result<(), BackendError> {
        match self {
            Sandbox::Jail(s) => s.destroy().await.map_err(BackendError::from),
        }
    }
}
