//! The daemon's TOML configuration, parsed and validated once at start.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::pool_spec::{PoolFields, PoolSpec, PoolSpecError};

pub const DEFAULT_CONFIG_PATH: &str = "/etc/sessiond/config.toml";
pub const DEFAULT_LISTEN_UNIX: &str = "/run/sessiond/api.sock";
pub const DEFAULT_STATE_DIR: &str = "/var/lib/sessiond";
pub const DEFAULT_RUN_DIR: &str = "/run/sessiond";
pub const DEFAULT_UID_BASE: u32 = 200_000;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path} is invalid: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("listen_tcp is set but api_keys is empty: a TCP listener without keys would let anyone who can reach the port run code; add api_keys or remove listen_tcp")]
    TcpWithoutKeys,
    #[error("api_keys entry {0} is empty or has whitespace; use opaque tokens of at least 16 characters")]
    BadKey(usize),
    #[error("pool_full_status must be 429 or 404, got {0}")]
    PoolFullStatus(u16),
    #[error("rootfs is not set: set rootfs = \"<dir>\" to the directory printed by scripts/build-rootfs")]
    NoRootfs,
    #[error("{what} {path} does not exist: {hint}")]
    Missing {
        what: &'static str,
        path: PathBuf,
        hint: &'static str,
    },
    #[error("pool {name:?}")]
    Pool { name: String, source: PoolSpecError },
    #[error("pool {0:?} is defined twice")]
    DuplicatePool(String),
    #[error("cannot locate the current executable to find sessiond-agent beside it: {0}")]
    CurrentExe(std::io::Error),
}

/// One `[[pools]]` entry. Keys are the Azure property names; snake_case
/// spellings are accepted too.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolToml {
    pub name: String,
    #[serde(default, rename = "containerType", alias = "container_type")]
    pub container_type: Option<String>,
    #[serde(
        default,
        rename = "maxConcurrentSessions",
        alias = "max_concurrent_sessions"
    )]
    pub max_concurrent_sessions: Option<u64>,
    #[serde(
        default,
        rename = "readySessionInstances",
        alias = "ready_session_instances"
    )]
    pub ready_session_instances: Option<u64>,
    #[serde(
        default,
        rename = "cooldownPeriodInSeconds",
        alias = "cooldown_period_in_seconds"
    )]
    pub cooldown_period_in_seconds: Option<u64>,
    #[serde(default, rename = "networkStatus", alias = "network_status")]
    pub network_status: Option<String>,
    #[serde(default)]
    pub cpu: Option<f64>,
    #[serde(default)]
    pub memory: Option<String>,
    #[serde(default)]
    pub disk: Option<String>,
    #[serde(default)]
    pub pids: Option<u64>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
}

impl PoolToml {
    fn into_fields(self) -> PoolFields {
        PoolFields {
            name: self.name,
            container_type: self.container_type,
            max_concurrent_sessions: self.max_concurrent_sessions,
            ready_session_instances: self.ready_session_instances,
            cooldown_seconds: self.cooldown_period_in_seconds,
            network_status: self.network_status,
            cpu: self.cpu,
            memory: self.memory,
            disk: self.disk,
            pids: self.pids,
            env: self.env,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigToml {
    #[serde(default)]
    listen_unix: Option<PathBuf>,
    #[serde(default)]
    listen_tcp: Option<SocketAddr>,
    #[serde(default)]
    api_keys: Vec<String>,
    #[serde(default)]
    state_dir: Option<PathBuf>,
    #[serde(default)]
    run_dir: Option<PathBuf>,
    #[serde(default)]
    rootfs: Option<PathBuf>,
    #[serde(default)]
    agent_binary: Option<PathBuf>,
    #[serde(default)]
    uid_base: Option<u32>,
    #[serde(default)]
    cgroup_name: Option<String>,
    #[serde(default)]
    pool_full_status: Option<u16>,
    #[serde(default)]
    pools: Vec<PoolToml>,
}

/// What a pool-full allocation is answered with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolFullStatus {
    TooManyRequests,
    NotFound,
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen_unix: PathBuf,
    pub listen_tcp: Option<SocketAddr>,
    pub api_keys: Vec<String>,
    pub state_dir: PathBuf,
    pub run_dir: PathBuf,
    pub rootfs: Option<PathBuf>,
    pub agent_binary: Option<PathBuf>,
    pub uid_base: u32,
    /// Name of the sandboxes' cgroup directory under the daemon's cgroup.
    pub cgroup_name: String,
    pub pool_full_status: PoolFullStatus,
    pub pools: Vec<PoolSpec>,
}

/// The default cgroup name, distinct per run_dir: the jail backend removes
/// whatever it finds under its cgroup name at start, so two daemons on one
/// host (a test next to the service) must not share one.
fn default_cgroup_name(run_dir: &Path) -> String {
    if run_dir == Path::new(DEFAULT_RUN_DIR) {
        return "sessiond-sandboxes".to_string();
    }
    // FNV-1a: stable across builds, unlike std's hasher.
    let hash = run_dir
        .as_os_str()
        .as_encoded_bytes()
        .iter()
        .fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
        });
    format!("sessiond-sandboxes-{:08x}", hash as u32)
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Config::parse(&text, path)
    }

    /// Parses and validates everything that needs no file system access.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let raw: ConfigToml = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.message().to_string(),
        })?;
        if raw.listen_tcp.is_some() && raw.api_keys.is_empty() {
            return Err(ConfigError::TcpWithoutKeys);
        }
        for (i, k) in raw.api_keys.iter().enumerate() {
            if k.is_empty() || k.chars().any(char::is_whitespace) {
                return Err(ConfigError::BadKey(i));
            }
        }
        let pool_full_status = match raw.pool_full_status.unwrap_or(429) {
            429 => PoolFullStatus::TooManyRequests,
            404 => PoolFullStatus::NotFound,
            other => return Err(ConfigError::PoolFullStatus(other)),
        };
        let mut pools: Vec<PoolSpec> = Vec::new();
        for p in raw.pools {
            let name = p.name.clone();
            let spec = p
                .into_fields()
                .validate()
                .map_err(|source| ConfigError::Pool {
                    name: name.clone(),
                    source,
                })?;
            if pools.iter().any(|q| q.name == spec.name) {
                return Err(ConfigError::DuplicatePool(name));
            }
            pools.push(spec);
        }
        let run_dir = raw
            .run_dir
            .unwrap_or_else(|| PathBuf::from(DEFAULT_RUN_DIR));
        let cgroup_name = match raw.cgroup_name {
            Some(n) => {
                let ok = !n.is_empty()
                    && n.len() <= 64
                    && n.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
                if !ok {
                    return Err(ConfigError::Parse {
                        path: path.to_path_buf(),
                        message: format!(
                            "cgroup_name {n:?} must be 1 to 64 characters of a-z, 0-9, '-' and '_'"
                        ),
                    });
                }
                n
            }
            None => default_cgroup_name(&run_dir),
        };
        Ok(Config {
            cgroup_name,
            listen_unix: raw
                .listen_unix
                .unwrap_or_else(|| PathBuf::from(DEFAULT_LISTEN_UNIX)),
            listen_tcp: raw.listen_tcp,
            api_keys: raw.api_keys,
            state_dir: raw
                .state_dir
                .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR)),
            run_dir,
            rootfs: raw.rootfs,
            agent_binary: raw.agent_binary,
            uid_base: raw.uid_base.unwrap_or(DEFAULT_UID_BASE),
            pool_full_status,
            pools,
        })
    }

    /// Checks the paths that `serve` needs and fills in the agent default.
    pub fn resolve_paths(&self) -> Result<(PathBuf, PathBuf), ConfigError> {
        let rootfs = self.rootfs.clone().ok_or(ConfigError::NoRootfs)?;
        if !rootfs.is_dir() {
            return Err(ConfigError::Missing {
                what: "rootfs",
                path: rootfs,
                hint: "run scripts/build-rootfs and put the directory it prints in the config",
            });
        }
        let agent = match &self.agent_binary {
            Some(p) => p.clone(),
            None => std::env::current_exe()
                .map_err(ConfigError::CurrentExe)?
                .with_file_name("sessiond-agent"),
        };
        if !agent.is_file() {
            return Err(ConfigError::Missing {
                what: "agent binary",
                path: agent,
                hint: "build it with `cargo build -p sessiond-agent` or set agent_binary",
            });
        }
        Ok((rootfs, agent))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Config, ConfigError> {
        Config::parse(s, Path::new("test.toml"))
    }

    #[test]
    fn empty_config_gets_defaults() {
        let c = parse("").unwrap();
        assert_eq!(c.listen_unix, PathBuf::from(DEFAULT_LISTEN_UNIX));
        assert_eq!(c.state_dir, PathBuf::from(DEFAULT_STATE_DIR));
        assert_eq!(c.pool_full_status, PoolFullStatus::TooManyRequests);
        assert!(c.pools.is_empty());
    }

    #[test]
    fn tcp_without_keys_is_refused() {
        let e = parse("listen_tcp = \"127.0.0.1:8080\"").unwrap_err();
        assert!(matches!(e, ConfigError::TcpWithoutKeys));
        let c =
            parse("listen_tcp = \"127.0.0.1:8080\"\napi_keys = [\"k-0123456789abcdef\"]").unwrap();
        assert_eq!(c.listen_tcp.unwrap().port(), 8080);
    }

    #[test]
    fn unknown_keys_are_refused() {
        let e = parse("listen_unixx = \"/tmp/x\"").unwrap_err();
        assert!(e.to_string().contains("listen_unixx"), "{e}");
        let e = parse("[[pools]]\nname = \"py\"\nmaxSessions = 3").unwrap_err();
        assert!(e.to_string().contains("maxSessions"), "{e}");
    }

    #[test]
    fn pools_are_validated() {
        let c = parse(
            "pool_full_status = 404\n[[pools]]\nname = \"py\"\nmaxConcurrentSessions = 3\ncooldownPeriodInSeconds = 2\n[pools.env]\nA = \"1\"\n\n[[pools]]\nname = \"sh\"\ncontainer_type = \"Shell\"",
        )
        .unwrap();
        assert_eq!(c.pool_full_status, PoolFullStatus::NotFound);
        assert_eq!(c.pools.len(), 2);
        assert_eq!(c.pools[0].max_concurrent_sessions, 3);
        assert_eq!(c.pools[0].env, vec![("A".into(), "1".into())]);
        let e = parse("[[pools]]\nname = \"py\"\n[[pools]]\nname = \"py\"").unwrap_err();
        assert!(matches!(e, ConfigError::DuplicatePool(_)));
        let e = parse("[[pools]]\nname = \"py\"\nnetworkStatus = \"EgressEnabled\"").unwrap_err();
        let cause = std::error::Error::source(&e).unwrap().to_string();
        assert!(cause.contains("egress is not supported yet"), "{cause}");
        assert!(parse("pool_full_status = 500").is_err());
    }

    #[test]
    fn example_config_is_valid() {
        let text = include_str!("../config.example.toml");
        let c = parse(text).unwrap();
        assert_eq!(c.pools.len(), 2);
        assert_eq!(c.pools[0].env, vec![("MPLBACKEND".into(), "Agg".into())]);
    }

    #[test]
    fn cgroup_names_differ_per_run_dir() {
        assert_eq!(parse("").unwrap().cgroup_name, "sessiond-sandboxes");
        let a = parse("run_dir = \"/tmp/a\"").unwrap().cgroup_name;
        let b = parse("run_dir = \"/tmp/b\"").unwrap().cgroup_name;
        assert_ne!(a, b);
        assert_eq!(a, parse("run_dir = \"/tmp/a\"").unwrap().cgroup_name);
        assert_eq!(parse("cgroup_name = \"mine\"").unwrap().cgroup_name, "mine");
        assert!(parse("cgroup_name = \"../x\"").is_err());
    }
}
