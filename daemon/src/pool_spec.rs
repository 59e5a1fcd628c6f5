//! Pool properties: the validated runtime form ([`PoolSpec`]) and the
//! ARM-shaped JSON form ([`PoolProperties`]) that the management API accepts,
//! returns, and persists under the state directory.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Why a pool definition was refused. Every message says what to change.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PoolSpecError {
    #[error("pool name {0:?} is invalid: use 2 to 32 characters of a-z, 0-9 and '-'")]
    Name(String),
    #[error("containerType {0:?} is not known: use PythonLTS or Shell")]
    UnknownContainerType(String),
    #[error("containerType CustomContainer is not supported yet: use PythonLTS or Shell")]
    CustomContainer,
    #[error("egress is not supported yet: use networkStatus EgressDisabled")]
    Egress,
    #[error("network status {0:?} is not known: use EgressDisabled")]
    UnknownNetworkStatus(String),
    #[error("{field} must be {rule}, got {value}")]
    Range {
        field: &'static str,
        rule: &'static str,
        value: String,
    },
    #[error("{field} {value:?} is not a size: write e.g. \"512Mi\", \"2Gi\" or a number of bytes")]
    Size { field: &'static str, value: String },
    #[error("environment variable name {0:?} is invalid: use letters, digits and '_', not starting with a digit")]
    EnvName(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ContainerType {
    PythonLTS,
    Shell,
}

impl ContainerType {
    pub fn as_str(self) -> &'static str {
        match self {
            ContainerType::PythonLTS => "PythonLTS",
            ContainerType::Shell => "Shell",
        }
    }

    pub fn parse(s: &str) -> Result<Self, PoolSpecError> {
        match s.to_ascii_lowercase().as_str() {
            "pythonlts" | "python" => Ok(ContainerType::PythonLTS),
            "shell" => Ok(ContainerType::Shell),
            "customcontainer" => Err(PoolSpecError::CustomContainer),
            _ => Err(PoolSpecError::UnknownContainerType(s.to_string())),
        }
    }
}

/// A validated pool definition.
#[derive(Debug, Clone, PartialEq)]
pub struct PoolSpec {
    pub name: String,
    pub container_type: ContainerType,
    pub max_concurrent_sessions: u32,
    pub ready_session_instances: u32,
    pub cooldown: Duration,
    pub cpu_millicores: u32,
    pub memory_bytes: u64,
    pub disk_bytes: u64,
    pub pids_max: u32,
    pub env: Vec<(String, String)>,
}

pub const DEFAULT_MAX_SESSIONS: u32 = 10;
pub const DEFAULT_READY: u32 = 2;
pub const DEFAULT_COOLDOWN_S: u64 = 300;
pub const DEFAULT_CPU: f64 = 1.0;
pub const DEFAULT_MEMORY: &str = "2Gi";
pub const DEFAULT_DISK: &str = "1Gi";
pub const DEFAULT_PIDS: u32 = 256;

/// Unvalidated pool fields, whichever front end (TOML, JSON, CLI) they came from.
#[derive(Debug, Clone, Default)]
pub struct PoolFields {
    pub name: String,
    pub container_type: Option<String>,
    pub max_concurrent_sessions: Option<u64>,
    pub ready_session_instances: Option<u64>,
    pub cooldown_seconds: Option<u64>,
    pub network_status: Option<String>,
    pub cpu: Option<f64>,
    pub memory: Option<String>,
    pub disk: Option<String>,
    pub pids: Option<u64>,
    pub env: BTreeMap<String, String>,
}

pub fn validate_pool_name(name: &str) -> Result<(), PoolSpecError> {
    let ok = (2..=32).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(PoolSpecError::Name(name.to_string()))
    }
}

fn range<T: PartialOrd + ToString>(
    field: &'static str,
    rule: &'static str,
    v: T,
    lo: T,
    hi: T,
) -> Result<T, PoolSpecError> {
    if v < lo || v > hi {
        return Err(PoolSpecError::Range {
            field,
            rule,
            value: v.to_string(),
        });
    }
    Ok(v)
}

impl PoolFields {
    pub fn validate(self) -> Result<PoolSpec, PoolSpecError> {
        validate_pool_name(&self.name)?;
        let container_type = match &self.container_type {
            Some(t) => ContainerType::parse(t)?,
            None => ContainerType::PythonLTS,
        };
        if let Some(status) = &self.network_status {
            match status.to_ascii_lowercase().as_str() {
                "egressdisabled" => {}
                "egressenabled" => return Err(PoolSpecError::Egress),
                _ => return Err(PoolSpecError::UnknownNetworkStatus(status.clone())),
            }
        }
        let max = range(
            "maxConcurrentSessions",
            "between 1 and 10000",
            self.max_concurrent_sessions
                .unwrap_or(DEFAULT_MAX_SESSIONS.into()),
            1,
            10_000,
        )?;
        let ready = range(
            "readySessionInstances",
            "between 0 and 1000",
            self.ready_session_instances.unwrap_or(DEFAULT_READY.into()),
            0,
            1000,
        )?;
        let cooldown = range(
            "cooldownPeriodInSeconds",
            "between 1 and 86400",
            self.cooldown_seconds.unwrap_or(DEFAULT_COOLDOWN_S),
            1,
            86_400,
        )?;
        let cpu = self.cpu.unwrap_or(DEFAULT_CPU);
        if !(cpu.is_finite() && (0.05..=256.0).contains(&cpu)) {
            return Err(PoolSpecError::Range {
                field: "cpu",
                rule: "between 0.05 and 256 cores",
                value: cpu.to_string(),
            });
        }
        let memory_bytes = parse_size("memory", self.memory.as_deref().unwrap_or(DEFAULT_MEMORY))?;
        range("memory", "at least 64Mi", memory_bytes, 64 << 20, u64::MAX)?;
        let disk_bytes = parse_size("disk", self.disk.as_deref().unwrap_or(DEFAULT_DISK))?;
        range("disk", "at least 1Mi", disk_bytes, 1 << 20, u64::MAX)?;
        let pids = range(
            "pids",
            "between 16 and 100000",
            self.pids.unwrap_or(DEFAULT_PIDS.into()),
            16,
            100_000,
        )?;
        for k in self.env.keys() {
            let valid = !k.is_empty()
                && !k.as_bytes()[0].is_ascii_digit()
                && k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
            if !valid {
                return Err(PoolSpecError::EnvName(k.clone()));
            }
        }
        Ok(PoolSpec {
            name: self.name,
            container_type,
            max_concurrent_sessions: max as u32,
            ready_session_instances: ready as u32,
            cooldown: Duration::from_secs(cooldown),
            cpu_millicores: (cpu * 1000.0).round() as u32,
            memory_bytes,
            disk_bytes,
            pids_max: pids as u32,
            env: self.env.into_iter().collect(),
        })
    }
}

/// Parses Kubernetes-style sizes: `512Mi`, `2Gi`, `1.5Gi`, `1G`, `1048576`.
pub fn parse_size(field: &'static str, s: &str) -> Result<u64, PoolSpecError> {
    let err = || PoolSpecError::Size {
        field,
        value: s.to_string(),
    };
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num.parse().map_err(|_| err())?;
    let mult: f64 = match unit.trim() {
        "" | "B" => 1.0,
        "Ki" | "KiB" => 1024.0,
        "Mi" | "MiB" => 1024.0 * 1024.0,
        "Gi" | "GiB" => 1024.0 * 1024.0 * 1024.0,
        "Ti" | "TiB" => 1024.0f64.powi(4),
        "K" | "k" | "KB" => 1e3,
        "M" | "MB" => 1e6,
        "G" | "GB" => 1e9,
        "T" | "TB" => 1e12,
        _ => return Err(err()),
    };
    let v = n * mult;
    if !v.is_finite() || !(1.0..=1e18).contains(&v) {
        return Err(err());
    }
    Ok(v.round() as u64)
}

/// Formats bytes back into the `Gi`/`Mi` notation where exact.
pub fn format_size(bytes: u64) -> String {
    const GI: u64 = 1 << 30;
    const MI: u64 = 1 << 20;
    if bytes & (GI - 1) == 0 {
        format!("{}Gi", bytes / GI)
    } else if bytes & (MI - 1) == 0 {
        format!("{}Mi", bytes / MI)
    } else {
        bytes.to_string()
    }
}

/// Environment variables as a JSON object or an ARM-style `[{name, value}]` list.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
pub enum EnvInput {
    Map(BTreeMap<String, String>),
    List(Vec<EnvVar>),
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnvVar {
    pub name: String,
    #[serde(default)]
    pub value: String,
}

impl EnvInput {
    fn into_map(self) -> BTreeMap<String, String> {
        match self {
            EnvInput::Map(m) => m,
            EnvInput::List(l) => l.into_iter().map(|v| (v.name, v.value)).collect(),
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ScaleConfiguration {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_concurrent_sessions: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_session_instances: Option<u64>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LifecycleConfiguration {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lifecycle_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cooldown_period_in_seconds: Option<u64>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DynamicPoolConfiguration {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cooldown_period_in_seconds: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lifecycle_configuration: Option<LifecycleConfiguration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub execution_type: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SessionNetworkConfiguration {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
}

/// The ARM `properties` of a session pool, plus sessiond's resource extras
/// (`cpu`, `memory`, `disk`, `pids`, `env`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PoolProperties {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool_management_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scale_configuration: Option<ScaleConfiguration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dynamic_pool_configuration: Option<DynamicPoolConfiguration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_network_configuration: Option<SessionNetworkConfiguration>,
    /// Accepted only to be refused with a clear message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub custom_container_template: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pids: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env: Option<EnvInput>,
}

impl PoolProperties {
    pub fn into_fields(self, name: &str) -> Result<PoolFields, PoolSpecError> {
        if self.custom_container_template.is_some() {
            return Err(PoolSpecError::CustomContainer);
        }
        let scale = self.scale_configuration.unwrap_or_default();
        let dynamic = self.dynamic_pool_configuration.unwrap_or_default();
        let cooldown = dynamic.cooldown_period_in_seconds.or_else(|| {
            dynamic
                .lifecycle_configuration
                .and_then(|l| l.cooldown_period_in_seconds)
        });
        Ok(PoolFields {
            name: name.to_string(),
            container_type: self.container_type,
            max_concurrent_sessions: scale.max_concurrent_sessions,
            ready_session_instances: scale.ready_session_instances,
            cooldown_seconds: cooldown,
            network_status: self.session_network_configuration.and_then(|n| n.status),
            cpu: self.cpu,
            memory: self.memory,
            disk: self.disk,
            pids: self.pids,
            env: self.env.map(EnvInput::into_map).unwrap_or_default(),
        })
    }

    /// The full, explicit properties of a validated spec.
    pub fn from_spec(spec: &PoolSpec) -> Self {
        PoolProperties {
            container_type: Some(spec.container_type.as_str().to_string()),
            pool_management_type: Some("Dynamic".to_string()),
            scale_configuration: Some(ScaleConfiguration {
                max_concurrent_sessions: Some(spec.max_concurrent_sessions.into()),
                ready_session_instances: Some(spec.ready_session_instances.into()),
            }),
            dynamic_pool_configuration: Some(DynamicPoolConfiguration {
                cooldown_period_in_seconds: Some(spec.cooldown.as_secs()),
                lifecycle_configuration: Some(LifecycleConfiguration {
                    lifecycle_type: Some("Timed".to_string()),
                    cooldown_period_in_seconds: Some(spec.cooldown.as_secs()),
                }),
                execution_type: Some("Timed".to_string()),
            }),
            session_network_configuration: Some(SessionNetworkConfiguration {
                status: Some("EgressDisabled".to_string()),
            }),
            custom_container_template: None,
            cpu: Some(f64::from(spec.cpu_millicores) / 1000.0),
            memory: Some(format_size(spec.memory_bytes)),
            disk: Some(format_size(spec.disk_bytes)),
            pids: Some(spec.pids_max.into()),
            env: Some(EnvInput::Map(spec.env.iter().cloned().collect())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(name: &str) -> PoolFields {
        PoolFields {
            name: name.into(),
            ..Default::default()
        }
    }

    #[test]
    fn defaults_match_the_documentation() {
        let s = fields("py").validate().unwrap();
        assert_eq!(s.container_type, ContainerType::PythonLTS);
        assert_eq!(s.max_concurrent_sessions, 10);
        assert_eq!(s.ready_session_instances, 2);
        assert_eq!(s.cooldown, Duration::from_secs(300));
        assert_eq!(s.cpu_millicores, 1000);
        assert_eq!(s.memory_bytes, 2 << 30);
        assert_eq!(s.disk_bytes, 1 << 30);
        assert_eq!(s.pids_max, 256);
    }

    #[test]
    fn names_follow_the_azure_rule() {
        assert!(fields("a").validate().is_err());
        assert!(fields("Upper").validate().is_err());
        assert!(fields("has_underscore").validate().is_err());
        assert!(fields(&"x".repeat(33)).validate().is_err());
        assert!(fields("ok-pool-1").validate().is_ok());
    }

    #[test]
    fn unsupported_features_are_refused_clearly() {
        let mut f = fields("pool");
        f.container_type = Some("CustomContainer".into());
        assert_eq!(f.validate(), Err(PoolSpecError::CustomContainer));
        let mut f = fields("pool");
        f.network_status = Some("EgressEnabled".into());
        let e = f.validate().unwrap_err();
        assert!(e.to_string().contains("egress is not supported yet"));
        let mut f = fields("pool");
        f.cooldown_seconds = Some(0);
        assert!(f.validate().is_err());
        let mut f = fields("pool");
        f.cooldown_seconds = Some(1);
        assert!(f.validate().is_ok());
    }

    #[test]
    fn sizes_parse_like_kubernetes() {
        assert_eq!(parse_size("m", "2Gi").unwrap(), 2 << 30);
        assert_eq!(parse_size("m", "512Mi").unwrap(), 512 << 20);
        assert_eq!(parse_size("m", "1.5Gi").unwrap(), 3 << 29);
        assert_eq!(parse_size("m", "1G").unwrap(), 1_000_000_000);
        assert_eq!(parse_size("m", "4096").unwrap(), 4096);
        assert!(parse_size("m", "lots").is_err());
        assert!(parse_size("m", "2Qi").is_err());
        assert_eq!(format_size(2 << 30), "2Gi");
        assert_eq!(format_size(768 << 20), "768Mi");
    }

    #[test]
    fn arm_properties_round_trip() {
        let json = r#"{"containerType":"Shell","scaleConfiguration":{"maxConcurrentSessions":3,"readySessionInstances":1},
            "dynamicPoolConfiguration":{"lifecycleConfiguration":{"lifecycleType":"Timed","cooldownPeriodInSeconds":7}},
            "sessionNetworkConfiguration":{"status":"EgressDisabled"},"memory":"1Gi","env":[{"name":"A","value":"b"}]}"#;
        let p: PoolProperties = serde_json::from_str(json).unwrap();
        let spec = p.into_fields("sh").unwrap().validate().unwrap();
        assert_eq!(spec.container_type, ContainerType::Shell);
        assert_eq!(spec.max_concurrent_sessions, 3);
        assert_eq!(spec.cooldown, Duration::from_secs(7));
        assert_eq!(spec.env, vec![("A".to_string(), "b".to_string())]);
        let back = PoolProperties::from_spec(&spec)
            .into_fields("sh")
            .unwrap()
            .validate()
            .unwrap();
        assert_eq!(back, spec);
        let bad: Result<PoolProperties, _> = serde_json::from_str(r#"{"maxSessions":3}"#);
        assert!(bad.is_err());
    }
}
